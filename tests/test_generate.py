"""Generation: the KV-cache path against full recomputation, batching against one prompt at a time,
stop tokens, and the sampling rules."""

from __future__ import annotations

import pytest
import torch

from nvlm.generate import chat, generate, sample_next
from test_model import random_model, sample_ids, small_config


def greedy_by_recompute(model, prompt, pixel_values, steps):
    """Greedy decoding that re-runs the whole sequence every step (no cache)."""
    ids = prompt.clone()
    new = []
    for _ in range(steps):
        logits = model(ids[None], pixel_values).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([token])])
    return new


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(), seed=3)


def test_cached_greedy_equals_recompute(model):
    q = model.config.tokens_per_tile
    prompt = sample_ids(17, 2 * q, start=2)
    pixels = torch.randn(2, 3, 56, 56)
    (cached,) = generate(model, [prompt], pixels, max_new_tokens=12)
    assert cached == greedy_by_recompute(model, prompt, pixels, 12)


def test_several_prompts_at_once_equal_each_alone(model):
    q = model.config.tokens_per_tile
    prompts = [sample_ids(17, 2 * q, start=2), sample_ids(5, 0, start=0),
               sample_ids(26, 3 * q, start=9)]
    pixels = [torch.randn(2, 3, 56, 56), None, torch.randn(3, 3, 56, 56)]
    together = generate(model, prompts, torch.cat([pixels[0], pixels[2]]), max_new_tokens=9)
    for prompt, pix, got in zip(prompts, pixels, together):
        assert got == generate(model, [prompt], pix, max_new_tokens=9)[0]


def test_stop_tokens_end_each_answer(model):
    prompt = sample_ids(9, 0, start=0)
    (free,) = generate(model, [prompt], None, max_new_tokens=10)
    stop = free[4]
    first = free.index(stop)
    (stopped,) = generate(model, [prompt], None, max_new_tokens=10, stop_token_ids=[stop],
                          stop_check_every=1)
    assert stopped == free[:first]


def test_sampling_is_reproducible_and_top_p_restricts_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(i))
                         for i in range(400)])
    # top_p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375.
    assert set(draws.flatten().tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.08)
    a = sample_next(logits.repeat(8, 1), 1.0, 1.0, torch.Generator().manual_seed(5))
    b = sample_next(logits.repeat(8, 1), 1.0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert int(sample_next(logits, 0.0)) == 0


def test_tiny_top_p_sampling_is_greedy(model):
    prompt = sample_ids(11, 0, start=0)
    (greedy,) = generate(model, [prompt], None, max_new_tokens=6)
    (nucleus,) = generate(model, [prompt], None, max_new_tokens=6, temperature=0.7, top_p=1e-6,
                          generator=torch.Generator().manual_seed(0))
    assert nucleus == greedy


def test_bad_arguments(model):
    prompt = sample_ids(5, 0, start=0)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [], None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [prompt], None, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [prompt], None, top_p=0.0)
    for temperature in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            generate(model, [prompt], None, temperature=temperature)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [prompt], None, max_new_tokens=model.config.llm.max_position_embeddings)


def test_cli_generate_answers_like_model_chat(tmp_path, capsys):
    from PIL import Image

    from nvlm.__main__ import main as cli_main
    from nvlm.config import NVLMConfig
    from nvlm.model import NVLM
    from nvlm.processing import NVLMProcessor

    torch.manual_seed(0)
    model = NVLM(NVLMConfig.from_preset("tiny"))
    model.init_weights()
    model.eval().save_pretrained(tmp_path / "model")
    image = tmp_path / "photo.png"
    Image.new("RGB", (300, 120), (200, 30, 30)).save(image)
    args = ["generate", "--model", str(tmp_path / "model"), "--image", str(image),
            "--prompt", "What colour?", "--max-new-tokens", "5", "--device", "cpu"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    expected = chat(model, NVLMProcessor.from_config(model.config), image, "What colour?",
                    max_new_tokens=5)
    assert printed == expected
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2

"""NVLM-X and NVLM-H end to end on the tiny presets: a fresh model equals its LLM, the image
reaches the text only where docs/nvlm.md section 8 says, packing and cached generation change nothing,
checkpoints round-trip, and bad configs or inputs fail with clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.config import NVLMConfig
from nvlm.generate import generate
from nvlm.packing import PackedLayout, sample_positions
from nvlm.model import NVLM
from nvlm.packing import pack_samples
from nvlm.processing import NVLMProcessor

ARCHS = ["X", "H"]


def wide_image(seed: int = 0) -> Image.Image:
    """300 x 150: a 2x1 grid of 112-px tiles plus the thumbnail in the tiny preset."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (150, 300, 3), dtype=np.uint8))


def build(arch: str, gates: float = 0.0, seed: int = 0) -> tuple[NVLM, NVLMProcessor]:
    torch.manual_seed(seed)
    config = NVLMConfig.from_preset("tiny", arch=arch)
    model = NVLM(config)
    model.init_weights()
    with torch.no_grad():
        for block in (model.xattn.values() if model.has_xattn else ()):
            block.attn_gate.fill_(gates)
            block.ffn_gate.fill_(gates)
    return model.eval(), NVLMProcessor.from_config(config)


def conversation(question: str = "what is the code?", answer: str = "1234"):
    return [{"from": "human", "value": f"look: <image>\n{question}"},
            {"from": "gpt", "value": answer}]


def run(model, batch):
    return model(batch.input_ids, batch.pixel_values, batch.labels, cu_seqlens=batch.cu_seqlens,
                 xattn=batch.xattn)


def llm_only_logits(model, batch):
    """The decoder alone on the same embeddings (NVLM-H: thumbnail rows included), no X-attn."""
    decoder_rows, _memory = model.image_rows(batch.pixel_values, batch.xattn)
    _, positions = sample_positions(batch.cu_seqlens, len(batch))
    layout = PackedLayout(batch.cu_seqlens, positions, batch.max_seqlen)
    h = model.language_model(model.embed(batch.input_ids, decoder_rows), layout)
    return model.language_model.logits(h)


def token_positions(processor, batch, text: str, sample: int = 0) -> list[int]:
    """Positions of the tokens of `text` (its first occurrence) in the packed sample."""
    ids = batch.input_ids[int(batch.cu_seqlens[sample]):int(batch.cu_seqlens[sample + 1])]
    needle = processor.tokenizer.encode(text)
    hay = ids.tolist()
    for i in range(len(hay) - len(needle) + 1):
        if hay[i:i + len(needle)] == needle:
            return list(range(int(batch.cu_seqlens[sample]) + i,
                              int(batch.cu_seqlens[sample]) + i + len(needle)))
    raise AssertionError(f"{text!r} not in the sample")


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_model_equals_its_llm(arch):
    model, processor = build(arch)
    batch = pack_samples([processor(conversation(), images=[wide_image()])])
    with torch.no_grad():
        logits = run(model, batch).logits
        torch.testing.assert_close(logits, llm_only_logits(model, batch), rtol=0, atol=0)
        if arch == "X":   # nothing of the image reaches a fresh NVLM-X
            other = pack_samples([processor(conversation(), images=[wide_image(seed=1)])])
            assert torch.equal(run(model, other).logits, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_with_open_gates_the_image_matters_after_it_only(arch):
    model, processor = build(arch, gates=1.0)
    batch = pack_samples([processor(conversation(), images=[wide_image()])])
    other = pack_samples([processor(conversation(), images=[wide_image(seed=1)])])
    with torch.no_grad():
        a, b = run(model, batch).logits, run(model, other).logits
    before = token_positions(processor, batch, "look: ")
    after = token_positions(processor, batch, "what is the code?")
    assert torch.equal(a[before], b[before])
    assert (a[after] - b[after]).abs().max() > 1e-3


def perturbed_tile(batch, tile: int):
    pixel_values = batch.pixel_values.clone()
    pixel_values[tile] += torch.randn_like(pixel_values[tile])
    return dataclasses.replace(batch, pixel_values=pixel_values)


def test_x_tile_tag_sees_its_own_tile_only():
    model, processor = build("X", gates=1.0)
    batch = pack_samples([processor(conversation(), images=[wide_image()])])
    assert batch.num_tiles == [3]
    tag_1 = token_positions(processor, batch, "<tile_1>")
    tag_2 = token_positions(processor, batch, "<tile_2>")
    with torch.no_grad():
        base = run(model, batch).logits
        tile_2_changed = run(model, perturbed_tile(batch, 1)).logits
        tile_1_changed = run(model, perturbed_tile(batch, 0)).logits
    assert torch.equal(tile_2_changed[tag_1], base[tag_1])
    assert (tile_2_changed[tag_2] - base[tag_2]).abs().max() > 1e-3
    assert (tile_1_changed[tag_1] - base[tag_1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_each_sample_alone(arch):
    model, processor = build(arch, gates=0.7)
    samples = [processor(conversation("first?", "12"), images=[wide_image(2)]),
               processor([{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]),
               processor(conversation("third?", "9876"), images=[wide_image(3)])]
    with torch.no_grad():
        packed = run(model, pack_samples(samples))
        start = 0
        for sample in samples:
            alone = run(model, pack_samples([sample]))
            torch.testing.assert_close(packed.logits[start:start + len(sample)], alone.logits,
                                       rtol=1e-5, atol=1e-5)
            start += len(sample)


@pytest.mark.parametrize("arch", ["D"] + ARCHS)
def test_training_forward_runs_the_last_layer_at_the_targets_only(arch):
    """return_logits=False (the trainer's call) runs the last decoder layer's queries and MLP at
    the loss targets alone (llm.py docstring); loss and every gradient equal the full forward's."""
    model, processor = build(arch, gates=0.6, seed=5)
    model.double().train()
    samples = [processor(conversation("first?", "12"), images=[wide_image(2)]),
               processor([{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]),
               processor(conversation("third?", "9876"), images=[wide_image(3)])]
    batch = pack_samples(samples)
    batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.double())
    mlp_rows = []
    last_mlp = model.language_model.model.layers[-1].mlp
    hook = last_mlp.register_forward_hook(lambda module, args, out: mlp_rows.append(len(out)))
    results = []
    try:
        for return_logits in (True, False):
            model.zero_grad(set_to_none=True)
            out = model(batch.input_ids, batch.pixel_values, batch.labels,
                        cu_seqlens=batch.cu_seqlens, xattn=batch.xattn,
                        return_logits=return_logits)
            out.loss.backward()
            results.append((out.loss.detach(), out.num_label_tokens,
                            {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}))
    finally:
        hook.remove()
    assert mlp_rows == [len(batch), results[1][1]] and 0 < results[1][1] < len(batch)
    (full_loss, full_count, full_grads), (loss, count, grads) = results
    assert count == full_count
    torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_causal_key_ranges_skip_empty_samples():
    layout = PackedLayout(torch.tensor([0, 3, 3, 7, 7, 8], dtype=torch.int32),
                          torch.zeros(8, dtype=torch.long), 4)
    start, end = layout.causal_key_ranges(torch.tensor([0, 2, 3, 6, 7]))
    assert start.tolist() == [0, 0, 3, 3, 7] and end.tolist() == [1, 3, 4, 7, 8]
    assert start.dtype == end.dtype == torch.int32


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_recomputation(arch):
    model, processor = build(arch, gates=0.5, seed=3)
    prompts = [processor.prompt("<image>\nread it", images=[wide_image(4)]),
               processor.prompt("hello there")]
    batch = pack_samples(prompts)
    tokens = generate(model, [p.input_ids for p in prompts], batch.pixel_values,
                      xattn=batch.xattn, max_new_tokens=6)
    for prompt, got in zip(prompts, tokens):
        ids = prompt.input_ids
        expected = []
        with torch.no_grad():
            for _ in range(6):   # greedy by full recomputation: the prompt plus what came so far
                sample = dataclasses.replace(prompt, input_ids=ids, labels=ids.clone(),
                                             xattn=extended(prompt.xattn, len(ids)))
                step = pack_samples([sample])
                logits = run(model, step).logits
                expected.append(int(logits[-1].argmax()))
                ids = torch.cat([ids, torch.tensor([expected[-1]])])
        assert got == expected[:len(got)] and len(got) >= 1


def extended(xattn, length: int):
    """A prompt's X-attn description grown to `length` tokens: new tokens are text after it."""
    grow = length - xattn.image_index.numel()
    pad = lambda t: None if t is None else torch.cat([t, t.new_full((grow,), -1)])  # noqa: E731
    return dataclasses.replace(xattn, image_index=pad(xattn.image_index),
                               tile_index=pad(xattn.tile_index))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_reaches_every_trained_part(arch):
    model, processor = build(arch)
    model.train()
    batch = pack_samples([processor(conversation(), images=[wide_image()])])
    run(model, batch).loss.backward()
    for i, block in model.xattn.items():
        # the gates are 0: only they (and nothing behind them) get a gradient at first
        assert block.attn_gate.grad is not None and float(block.attn_gate.grad.abs()) > 0, i
        assert block.ffn_gate.grad is not None and float(block.ffn_gate.grad.abs()) > 0, i
    model.zero_grad()
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.5)
    run(model, batch).loss.backward()
    assert model.mlp1[1].weight.grad.abs().max() > 0    # the image reaches the loss
    assert model.xattn["0"].k_proj.weight.grad.abs().max() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model, processor = build(arch, gates=0.3)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [f"NVLM_{arch}"]
    loaded = NVLM.from_pretrained(tmp_path).eval()
    assert loaded.config.arch == arch
    assert loaded.config.xattn_layers == model.config.xattn_layers
    assert loaded.config.projector.num_layers == model.config.projector.num_layers
    batch = pack_samples([processor(conversation(), images=[wide_image()])])
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, batch).logits, run(model, batch).logits,
                                   rtol=0, atol=0)


def test_presets_follow_the_paper():
    for name, every, count in (("72b", 8, 10), ("34b", 6, 10)):
        for arch in ARCHS:
            config = NVLMConfig.from_preset(name, arch=arch)
            assert config.xattn_layers == tuple(range(0, config.llm.num_layers, every))
            assert len(config.xattn_layers) == count
            assert config.projector.num_layers == (1 if arch == "X" else 2)


def test_bad_configs_and_inputs():
    config = NVLMConfig.from_preset("tiny", arch="X")
    with pytest.raises(ValueError, match="xattn_layers: expected sorted"):
        dataclasses.replace(config, xattn_layers=(2, 0)).validate()
    with pytest.raises(ValueError, match="xattn_layers: expected indices in \\[0, 3\\)"):
        dataclasses.replace(config, xattn_layers=(0, 3)).validate()
    with pytest.raises(ValueError, match="xattn_layers: expected at least one"):
        dataclasses.replace(config, xattn_layers=()).validate()
    model, processor = build("X")
    with pytest.raises(ValueError, match="max_tiles: expected at most config.max_tiles"):
        processor(conversation(), images=[wide_image()], max_tiles=config.max_tiles + 1)
    for markup in ("<tile_2>", "<Image>", "<tile_global_thumbnail>"):
        with pytest.raises(ValueError, match=f"contains the image markup '{markup}' as text"):
            processor(conversation(f"is {markup} here?"), images=[wide_image()])
    batch = pack_samples([processor(conversation(), images=[wide_image()])])
    with pytest.raises(ValueError, match="xattn: NVLM-X needs the X-attn inputs"):
        model(batch.input_ids, batch.pixel_values, cu_seqlens=batch.cu_seqlens)
    short = dataclasses.replace(batch.xattn, kv_start=batch.xattn.kv_start[:-1])
    with pytest.raises(ValueError, match="xattn.kv_start: expected input_ids' shape"):
        model(batch.input_ids, batch.pixel_values, cu_seqlens=batch.cu_seqlens, xattn=short)
    d_model = NVLM(NVLMConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="xattn: only NVLM-X/H"):
        d_model(batch.input_ids, batch.pixel_values, cu_seqlens=batch.cu_seqlens,
                xattn=batch.xattn)
    text = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    d_sample = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))(text)
    with pytest.raises(ValueError, match="mixed with NVLM-X/H"):
        pack_samples([d_sample, processor(text)])

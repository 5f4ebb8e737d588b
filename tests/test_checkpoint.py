"""nvlm.checkpoint: NVLM-D / InternVL-chat checkpoint directories.

Round trips are exact (every tensor, both projector flavours, tied and untied, zero-padded dummy
heads, sharded); checkpoints written by hand (padded heads, tokenizer files) and one converted
from Hugging Face's InternVL model load and give the logits their source model gives; a broken
checkpoint fails with one message that names every problem.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nvlm.checkpoint as checkpoint
from nvlm.config import NVLMConfig, VisionConfig
from nvlm.model import NVLM

LAYER0 = "vision_model.encoder.layers.0.attn."


# --------------------------------------------------------------------------------------------
# Helpers

def _tiny(vision: dict | None = None, llm: dict | None = None, projector: dict | None = None,
          **fields) -> NVLMConfig:
    config = NVLMConfig.from_preset("tiny")
    return dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, **(vision or {})),
        llm=dataclasses.replace(config.llm, **(llm or {})),
        projector=dataclasses.replace(config.projector, **(projector or {})), **fields).validate()


# The ViT of NVLM-D-72B in miniature: RMSNorm, q/k norm, no qkv bias, 2 real + 2 dummy heads.
DUMMY_HEADS_VISION = dict(hidden_size=64, num_heads=2, intermediate_size=128, norm_type="rms_norm",
                          qk_normalization=True, qkv_bias=False, layerscale_init=0.1,
                          num_dummy_heads=2)

VARIANTS = {
    "tiny": _tiny(),                                             # tied, InternVL2-style projector
    "nvlm_d_projector": _tiny(projector=dict(hidden_size=512, bias=False)),  # hidden = LLM MLP
    "untied_llama": _tiny(llm=dict(tie_word_embeddings=False, attention_bias=False)),
    "dummy_heads": _tiny(vision=DUMMY_HEADS_VISION, projector=dict(hidden_size=512, bias=False)),
    "dummy_heads_qkv_bias": _tiny(vision=dict(hidden_size=96, num_heads=3, num_dummy_heads=1)),
}


def _model(config: NVLMConfig, seed: int = 0) -> NVLM:
    """A model whose every tensor is distinct random data (no constant norms or LayerScales)."""
    torch.manual_seed(seed)
    model = NVLM(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(config: NVLMConfig, num_tiles: int = 2, seed: int = 1):
    """(input_ids (1, L), pixel_values (N, 3, S, S)): text around the placeholders of N tiles."""
    gen = torch.Generator().manual_seed(seed)
    placeholders = torch.full((num_tiles * config.tokens_per_tile,), config.image_token_id)
    text = lambda n: torch.randint(0, 256, (n,), generator=gen)  # noqa: E731
    input_ids = torch.cat([text(5), placeholders, text(7)])[None]
    size = config.tile_size
    return input_ids, torch.randn(num_tiles, 3, size, size, generator=gen)


def _logits(model: NVLM, config: NVLMConfig) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs(config)).logits


def _assert_same_tensors(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def _edit_config_json(directory: Path, edit) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _internvl_chat_config_json(vision: dict, llm: dict) -> dict:
    """A config.json as the InternVL-chat / NVLM-D releases write it (no nvlm_config)."""
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "template": "chatml",
            "force_image_size": vision["image_size"], "use_thumbnail": True,
            "max_dynamic_patch": 6, "vision_config": vision, "llm_config": llm}


def _write_tokenizer_json(directory: Path, added: dict[str, int]) -> None:
    """A minimal but valid `tokenizers` file: a word-level model plus added special tokens."""
    data = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": token, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}
                             for token, i in added.items()],
            "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}
    (directory / "tokenizer.json").write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_exact(tmp_path, variant):
    config = VARIANTS[variant]
    model = _model(config)
    before = _logits(model, config)
    model.save_pretrained(tmp_path / "ckpt")

    loaded = NVLM.from_pretrained(tmp_path / "ckpt")

    assert loaded.config == config
    _assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert torch.equal(_logits(loaded, config), before)
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    expected_arch = "Qwen2ForCausalLM" if config.llm.attention_bias else "LlamaForCausalLM"
    assert data["llm_config"]["architectures"] == [expected_arch]
    assert (data["ps_version"], data["select_layer"], data["downsample_ratio"]) == ("v2", -1, 0.5)


@pytest.mark.parametrize("variant", ["dummy_heads", "dummy_heads_qkv_bias"])
def test_saved_dummy_heads_are_zero_padding(tmp_path, variant):
    config = VARIANTS[variant]
    model = _model(config)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    v = config.vision
    real, padded = v.hidden_size, (v.num_heads + v.num_dummy_heads) * v.head_dim

    assert saved[LAYER0 + "qkv.weight"].shape == (3 * padded, v.hidden_size)
    assert saved[LAYER0 + "proj.weight"].shape == (v.hidden_size, padded)
    qkv = saved[LAYER0 + "qkv.weight"].view(3, padded, -1)
    assert torch.equal(qkv[:, :real].reshape(3 * real, -1),
                       model.state_dict()[LAYER0 + "qkv.weight"])
    assert not qkv[:, real:].any() and not saved[LAYER0 + "proj.weight"][:, real:].any()
    if v.qkv_bias:
        assert saved[LAYER0 + "qkv.bias"].shape == (3 * padded,)
    if v.qk_normalization:
        assert saved[LAYER0 + "q_norm.weight"].shape == (padded,)
    # The model itself holds only the real heads; num_params counts what the file adds on top.
    file_numel = sum(t.numel() for t in saved.values())
    assert file_numel == model.num_params(include_dummy_heads=True)


def test_sharded_save_loads_back(tmp_path):
    config = VARIANTS["dummy_heads"]
    model = _model(config)
    limit = 200_000
    checkpoint.save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=limit)

    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "ckpt" / "model.safetensors").exists()
    for shard in shards:
        tensors = load_file(tmp_path / "ckpt" / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
    loaded = NVLM.from_pretrained(tmp_path / "ckpt")
    _assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_dtype_is_kept_unless_asked(tmp_path):
    config = VARIANTS["tiny"]
    model = _model(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)

    kept = NVLM.from_pretrained(tmp_path)
    _assert_same_tensors(model.state_dict(), kept.state_dict())
    as_fp32 = NVLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert {t.dtype for t in as_fp32.state_dict().values()} == {torch.float32}
    assert torch.equal(as_fp32.mlp1[1].weight, model.mlp1[1].weight.float())


def test_save_replaces_a_directory_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    first, second = _model(VARIANTS["tiny"], seed=0), _model(VARIANTS["tiny"], seed=1)
    first.save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]      # no temporary left over
    _assert_same_tensors(first.state_dict(), NVLM.from_pretrained(target).state_dict())

    second.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (target / "stale.txt").exists()
    _assert_same_tensors(second.state_dict(), NVLM.from_pretrained(target).state_dict())


def test_saved_config_supplies_what_the_layout_cannot_say(tmp_path):
    config = _tiny(thumbnail_tag="<tile_global>", max_tiles=4, image_token_id=260,
                   projector=dict(layernorm_eps=1e-6))
    _model(config).save_pretrained(tmp_path)

    assert NVLM.from_pretrained(tmp_path).config == config
    override = NVLM.from_pretrained(tmp_path, image_token_id=261, max_tiles=2).config
    assert (override.image_token_id, override.max_tiles) == (261, 2)


# --------------------------------------------------------------------------------------------
# Checkpoints written by hand

def _pad_heads_by_hand(state: dict, vision: VisionConfig) -> dict:
    """NVLM-D-72B's padding, written from its description: per layer, q, k and v each get
    `dummy` all-zero heads after the real ones, proj gets zero input columns, and the q/k-norm
    weights get entries for the dummy heads (any value: they scale zeros; ones here)."""
    c, d = vision.hidden_size, vision.head_dim
    padded_width = (vision.num_heads + vision.num_dummy_heads) * d
    out = dict(state)
    for i in range(vision.num_layers):
        prefix = f"vision_model.encoder.layers.{i}.attn."
        qkv = state[prefix + "qkv.weight"]
        padded = torch.zeros(3 * padded_width, c)
        for part in range(3):
            padded[part * padded_width: part * padded_width + c] = qkv[part * c: (part + 1) * c]
        out[prefix + "qkv.weight"] = padded
        proj = torch.zeros(c, padded_width)
        proj[:, :c] = state[prefix + "proj.weight"]
        out[prefix + "proj.weight"] = proj
        for norm in ("q_norm.weight", "k_norm.weight"):
            out[prefix + norm] = torch.cat([state[prefix + norm], torch.ones(padded_width - c)])
    return out


def test_hand_padded_dummy_head_checkpoint_matches_unpadded_model(tmp_path):
    config = VARIANTS["dummy_heads"]
    unpadded = _model(dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, num_dummy_heads=0)))
    v, llm = config.vision, config.llm
    save_file(_pad_heads_by_hand(unpadded.state_dict(), v), tmp_path / "model.safetensors")
    # As NVLM-D-72B's config.json: num_attention_heads counts the real heads, no dummy-head key.
    vision_json = {"hidden_size": v.hidden_size, "image_size": v.image_size,
                   "patch_size": v.patch_size, "intermediate_size": v.intermediate_size,
                   "num_attention_heads": v.num_heads, "num_hidden_layers": v.num_layers,
                   "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "qk_normalization": True,
                   "qkv_bias": False, "initializer_factor": 0.1}
    llm_json = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
                "intermediate_size": llm.intermediate_size,
                "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
                "num_key_value_heads": llm.num_kv_heads, "rope_theta": llm.rope_theta,
                "rms_norm_eps": llm.rms_norm_eps, "tie_word_embeddings": True,
                "max_position_embeddings": llm.max_position_embeddings}
    config_json = _internvl_chat_config_json(vision_json, llm_json)
    (tmp_path / "config.json").write_text(json.dumps(config_json))

    loaded = NVLM.from_pretrained(tmp_path, image_token_id=config.image_token_id)

    assert loaded.config.vision.num_dummy_heads == 2
    assert loaded.config.projector == config.projector
    assert loaded.config.thumbnail_tag == NVLMConfig().thumbnail_tag
    _assert_same_tensors(unpadded.state_dict(), loaded.state_dict())
    torch.testing.assert_close(_logits(loaded, config), _logits(unpadded, config), rtol=0, atol=0)


@pytest.mark.parametrize("token", ["<|vision_pad|>", "<IMG_CONTEXT>"])
def test_image_token_id_from_tokenizer_json(tmp_path, token):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: data.pop("nvlm_config"))
    _write_tokenizer_json(tmp_path, {"<|endoftext|>": 256, token: 262})

    assert NVLM.from_pretrained(tmp_path).config.image_token_id == 262


def test_no_image_token_id_anywhere(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: data.pop("nvlm_config"))

    with pytest.raises(ValueError, match="image_token_id"):
        NVLM.from_pretrained(tmp_path)
    assert NVLM.from_pretrained(tmp_path, image_token_id=259).config.image_token_id == 259


def test_tied_checkpoint_may_carry_an_equal_lm_head(tmp_path):
    model = _model(VARIANTS["tiny"])
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    embed = tensors["language_model.model.embed_tokens.weight"]

    save_file({**tensors, "language_model.lm_head.weight": embed.clone()},
              tmp_path / "model.safetensors")
    _assert_same_tensors(model.state_dict(), NVLM.from_pretrained(tmp_path).state_dict())

    save_file({**tensors, "language_model.lm_head.weight": embed + 1},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("language_model.lm_head.weight")):
        NVLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# Broken checkpoints

def test_mismatched_tensors_are_reported_together(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
    # In a layer the config counts: a tenth layer would be refused first, by the size check.
    tensors["vision_model.encoder.layers.2.ls9"] = torch.zeros(128)
    tensors["mlp1.3.weight"] = torch.zeros(190, 192)
    save_file(tensors, tmp_path / "model.safetensors")

    with pytest.raises(ValueError) as error:
        NVLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing (1)" in message and "vision_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "unexpected (1)" in message and "vision_model.encoder.layers.2.ls9" in message
    assert "wrong shape (1)" in message
    assert "mlp1.3.weight: expected (192, 192), found (190, 192)" in message


def test_config_that_disagrees_with_the_tensors(tmp_path):
    _model(VARIANTS["dummy_heads"]).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: (data.pop("nvlm_config"),
                                              data["vision_config"].update(qk_normalization=False)))

    with pytest.raises(ValueError, match=r"unexpected \(6\)") as error:
        NVLM.from_pretrained(tmp_path, image_token_id=259)
    assert LAYER0 + "q_norm.weight" in str(error.value)


def test_nvlm_config_that_disagrees_with_config_json(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: data["llm_config"].update(rope_theta=5e5))

    with pytest.raises(ValueError, match=r"llm\.rope_theta: 10000\.0 in nvlm_config, 500000\.0"):
        NVLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("tensor", ["qkv.weight", "proj.weight"])
def test_nonzero_dummy_heads_are_refused(tmp_path, tensor):
    _model(VARIANTS["dummy_heads"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "vision_model.encoder.layers.2.attn." + tensor
    if tensor == "qkv.weight":
        tensors[name][-1, 0] = 0.5                    # last row: v of the last dummy head
    else:
        tensors[name][3, -1] = 0.5                    # last column: the last dummy head
    save_file(tensors, tmp_path / "model.safetensors")

    with pytest.raises(ValueError, match=re.escape(name) + ".*must be zero"):
        NVLM.from_pretrained(tmp_path)


def test_ps_version_v1_is_refused(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: data.update(ps_version="v1"))

    with pytest.raises(ValueError, match="ps_version 'v1' is not supported"):
        NVLM.from_pretrained(tmp_path)


def test_pickle_only_directory_is_refused(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")

    with pytest.raises(ValueError, match=r"only safetensors.*pytorch_model\.bin"):
        NVLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# A checkpoint converted from Hugging Face's InternVL model

def _internvl_chat_state_dict_from_hf(hf_state: dict, tied: bool) -> dict:
    """transformers' InternVLForConditionalGeneration layout -> the original InternVL-chat layout
    (the inverse of transformers' convert_internvl_weights_to_hf.py)."""
    renames = [
        (r"^model\.vision_tower\.embeddings\.cls_token$",
         "vision_model.embeddings.class_embedding"),
        (r"^model\.vision_tower\.embeddings\.position_embeddings$",
         "vision_model.embeddings.position_embedding"),
        (r"^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.",
         "vision_model.embeddings.patch_embedding."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_(\d)$",
         r"vision_model.encoder.layers.\1.ls\2"),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.",
         r"vision_model.encoder.layers.\1.norm1."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.",
         r"vision_model.encoder.layers.\1.norm2."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
         r"vision_model.encoder.layers.\1.attn.proj."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.",
         r"vision_model.encoder.layers.\1.attn.\2."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.",
         r"vision_model.encoder.layers.\1.mlp."),
        (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
        (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
        (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
    ]
    qkv = re.compile(
        r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
    out, parts = {}, {}
    for name, tensor in hf_state.items():
        if match := qkv.match(name):
            layer, which, kind = match.groups()
            parts[(layer, kind, which)] = tensor
            continue
        if tied and name == "lm_head.weight":
            continue                  # a tied checkpoint stores the table once
        for pattern, replacement in renames:
            new_name, count = re.subn(pattern, replacement, name)
            if count:
                out[new_name] = tensor.clone()
                break
        else:
            raise AssertionError(f"no InternVL-chat name for {name}")
    for layer, kind in sorted({(layer, kind) for layer, kind, _ in parts}):
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts[(layer, kind, which)] for which in "qkv"])
    return out


HF_FLAVOURS = {
    # InternViT-300M style (InternVL2-1B): LayerNorm, qkv bias; tied Qwen2.
    "layer_norm_qkv_bias": dict(vision=dict(norm_type="layer_norm", attention_bias=True,
                                            use_qk_norm=False, layer_norm_eps=1e-5),
                                tied=True, rms_norm_eps=1e-6, rope_theta=1e4),
    # InternViT-6B style (NVLM-D-72B): RMSNorm, q/k norm (eps fixed at 1e-6 in transformers),
    # no qkv bias; untied Qwen2.
    "rms_norm_qk_norm": dict(vision=dict(norm_type="rms_norm", attention_bias=False,
                                         use_qk_norm=True, layer_norm_eps=1e-6),
                             tied=False, rms_norm_eps=1e-5, rope_theta=1e6),
}


@pytest.mark.parametrize("flavour", list(HF_FLAVOURS))
def test_hf_internvl_checkpoint_gives_the_same_logits(tmp_path, flavour):
    transformers = pytest.importorskip("transformers")
    spec = HF_FLAVOURS[flavour]
    image_token_id = 120
    vision_config = transformers.InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=56, patch_size=14, **spec["vision"])
    text_config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=spec["rms_norm_eps"],
        rope_theta=spec["rope_theta"], max_position_embeddings=256)
    hf_config = transformers.InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        tie_word_embeddings=spec["tied"])
    torch.manual_seed(0)
    hf = transformers.InternVLForConditionalGeneration(hf_config).eval()
    assert (hf.lm_head.weight is hf.model.language_model.embed_tokens.weight) == spec["tied"]
    with torch.no_grad():                 # random everything: no constant norm, LayerScale, CLS
        for name, p in hf.named_parameters():
            scale_one = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if scale_one else 0.0))

    v = vision_config
    vision_json = {"hidden_size": v.hidden_size, "image_size": 56, "patch_size": 14,
                   "intermediate_size": v.intermediate_size,
                   "num_attention_heads": v.num_attention_heads,
                   "num_hidden_layers": v.num_hidden_layers, "norm_type": v.norm_type,
                   "layer_norm_eps": v.layer_norm_eps, "qk_normalization": v.use_qk_norm,
                   "qkv_bias": v.attention_bias, "initializer_factor": v.layer_scale_init_value,
                   "hidden_act": v.hidden_act}
    t = text_config
    llm_json = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads, "hidden_act": t.hidden_act,
                "rope_parameters": dict(t.rope_parameters), "rms_norm_eps": t.rms_norm_eps,
                "tie_word_embeddings": spec["tied"],
                "max_position_embeddings": t.max_position_embeddings}
    config_json = _internvl_chat_config_json(vision_json, llm_json)
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    save_file(_internvl_chat_state_dict_from_hf(hf.state_dict(), spec["tied"]),
              tmp_path / "model.safetensors")

    ours = NVLM.from_pretrained(tmp_path, image_token_id=image_token_id)

    assert ours.config.tokens_per_tile == 4
    # Two rows: one tile in the first, two in the second; placeholders fill in row-major order.
    gen = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 100, (n,), generator=gen)  # noqa: E731
    image = lambda tiles: torch.full((4 * tiles,), image_token_id)  # noqa: E731
    input_ids = torch.stack([torch.cat([text(3), image(1), text(9)]),
                             torch.cat([text(2), image(2), text(6)])])
    pixel_values = torch.randn(3, 3, 56, 56, generator=gen)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, pixel_values=pixel_values).logits
        actual = ours(input_ids, pixel_values).logits
        other_images = ours(input_ids, pixel_values.flip(-1)).logits
    # The comparison means something: logits are not tiny and depend on the images.
    assert expected.abs().max() > 1.0 and (other_images - actual).abs().max() > 1e-2
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)   # measured: 2e-6


# --------------------------------------------------------------------------------------------
# Untrusted checkpoints: sizes, paths, weights and types are checked before they can cost anything

def _refuse_to_build(monkeypatch) -> None:
    """Make any model construction inside load_pretrained fail the test."""
    def no_model(config):
        raise AssertionError("load_pretrained built a model before checking the config's sizes")

    monkeypatch.setattr(checkpoint, "NVLM", no_model)


def _without_nvlm_config(directory: Path, edit=lambda data: None) -> None:
    """Drop the saved nvlm_config (so config.json alone describes the model), then `edit`."""
    _edit_config_json(directory, lambda data: (data.pop("nvlm_config"), edit(data)))


@pytest.mark.parametrize("section, key, value, found", [
    ("vision_config", "num_hidden_layers", 10**9, "3"),
    ("llm_config", "num_hidden_layers", 10**9, "3"),
    ("vision_config", "hidden_size", 2**20, "128"),
    ("vision_config", "intermediate_size", 2**30, "512"),
    ("llm_config", "vocab_size", 10**12, "264"),
    ("llm_config", "intermediate_size", 1024, "512"),
    ("llm_config", "num_key_value_heads", 3, "64"),
])
def test_config_sizes_are_checked_against_the_tensor_headers_first(tmp_path, monkeypatch, section,
                                                                   key, value, found):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    _without_nvlm_config(tmp_path, lambda data: data[section].update({key: value}))
    _refuse_to_build(monkeypatch)

    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        NVLM.from_pretrained(tmp_path, image_token_id=259)
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert f"{section}.{key}" in message and found in message, message


def test_xattn_layers_are_checked_against_the_tensor_headers_first(tmp_path, monkeypatch):
    _model(NVLMConfig.from_preset("tiny", arch="H")).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: data["nvlm_config"].update(xattn_layers=[0, 1, 2]))
    _refuse_to_build(monkeypatch)

    with pytest.raises(ValueError, match=r"nvlm_config\.xattn_layers.*\[0, 1, 2\].*\[0, 2\]"):
        NVLM.from_pretrained(tmp_path)


def _copy_checkpoint(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())


@pytest.mark.parametrize("entry", [
    "../other/{shard}", "{other}/{shard}", "/etc/passwd", "/proc/self/environ", "sub/{shard}",
    "./{shard}", ".", "..", "", "{shard}\x00", 7, None, ["{shard}"],
])
def test_index_entries_must_be_plain_file_names_in_the_directory(tmp_path, monkeypatch, entry):
    source = tmp_path / "ckpt"
    checkpoint.save_pretrained(_model(VARIANTS["tiny"]), source, max_shard_bytes=400_000)
    # A valid copy outside the checkpoint: before this check, "../other/..." loaded it.
    _copy_checkpoint(source, tmp_path / "other")
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    if isinstance(entry, str):
        entry = entry.format(shard=shard, other=tmp_path / "other")
    elif isinstance(entry, list):
        entry = [shard]
    index["weight_map"][name] = entry
    index_path.write_text(json.dumps(index))
    opened = []
    real_safe_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open",
                        lambda file, *args, **kwargs: (opened.append(Path(file)),
                                                       real_safe_open(file, *args, **kwargs))[1])

    with pytest.raises(ValueError, match=re.escape(name)):
        NVLM.from_pretrained(source)
    assert opened == []                        # refused before any shard was opened


def test_index_entries_may_be_symbolic_links_as_in_the_hugging_face_cache(tmp_path):
    model = _model(VARIANTS["tiny"])
    checkpoint.save_pretrained(model, tmp_path / "saved", max_shard_bytes=400_000)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((tmp_path / "saved").iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")

    _assert_same_tensors(model.state_dict(), NVLM.from_pretrained(snapshot).state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_named(tmp_path, bad):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    names = ["mlp1.1.weight", "language_model.model.layers.2.mlp.up_proj.weight"]
    for name in names:
        tensors[name][0, 1] = bad
    save_file(tensors, tmp_path / "model.safetensors")

    with pytest.raises(ValueError, match="not finite") as error:
        NVLM.from_pretrained(tmp_path)
    assert all(name in str(error.value) for name in names)
    loaded = NVLM.from_pretrained(tmp_path, check_weights=False)          # the opt-out
    assert not torch.isfinite(loaded.mlp1[1].weight).all()


def test_overflow_in_the_requested_dtype_is_named(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mlp1.3.weight"][2, 2] = 1e6                          # finite in float32, inf in fp16
    save_file(tensors, tmp_path / "model.safetensors")

    NVLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"mlp1\.3\.weight.*not finite.*float16"):
        NVLM.from_pretrained(tmp_path, dtype=torch.float16)


def test_mixed_dtypes_are_named_unless_a_dtype_is_asked_for(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    odd = "vision_model.encoder.layers.1.attn.proj.weight"
    tensors[odd] = tensors[odd].half()
    save_file(tensors, tmp_path / "model.safetensors")

    with pytest.raises(ValueError, match=re.escape(odd) + ".*F16") as error:
        NVLM.from_pretrained(tmp_path)
    assert "dtype=" in str(error.value)                            # says how to load it anyway
    as_fp32 = NVLM.from_pretrained(tmp_path, dtype=torch.float32)  # one dtype: well-defined
    assert {t.dtype for t in as_fp32.state_dict().values()} == {torch.float32}
    unchecked = NVLM.from_pretrained(tmp_path, check_weights=False)
    assert unchecked.state_dict()[odd].dtype == torch.float16


def test_integer_weights_are_named(tmp_path):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mlp1.0.bias"] = tensors["mlp1.0.bias"].long()
    save_file(tensors, tmp_path / "model.safetensors")

    for dtype in (None, torch.float32):            # the cast covers floating tensors only
        with pytest.raises(ValueError, match=r"mlp1\.0\.bias.*I64"):
            NVLM.from_pretrained(tmp_path, dtype=dtype)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all",
                                     (2**60).to_bytes(8, "little") + b"{}"])
def test_corrupt_safetensors_is_a_value_error_naming_the_file(tmp_path, content):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(content)

    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.safetensors"))):
        NVLM.from_pretrained(tmp_path)


def test_truncated_shard_is_a_value_error_naming_the_file(tmp_path):
    checkpoint.save_pretrained(_model(VARIANTS["tiny"]), tmp_path, max_shard_bytes=400_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4])

    with pytest.raises(ValueError, match=re.escape(str(shard))):
        NVLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\"text\"", "\udcff"])
def test_unreadable_json_is_a_value_error_naming_the_file(tmp_path, file, content):
    checkpoint.save_pretrained(_model(VARIANTS["tiny"]), tmp_path, max_shard_bytes=400_000)
    (tmp_path / file).write_bytes(content.encode("utf-8", "surrogateescape"))

    with pytest.raises(ValueError, match=re.escape(file)):
        NVLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("where, value", [
    ("llm_config.num_hidden_layers", "3"),
    ("llm_config.num_hidden_layers", "three"),
    ("llm_config.num_hidden_layers", 3.5),
    ("llm_config.num_hidden_layers", None),
    ("llm_config.num_hidden_layers", True),
    ("llm_config.num_attention_heads", 0),
    ("vision_config.num_attention_heads", -4),
    ("vision_config.patch_size", [14, "14"]),
    ("vision_config.qkv_bias", "false"),
    ("vision_config.layer_norm_eps", "1e-6"),
    ("llm_config.rope_theta", [1e4]),
    ("llm_config.architectures", 5),
    ("llm_config.rope_scaling", "linear"),
    ("downsample_ratio", "half"),
    ("max_dynamic_patch", "6"),
    ("vision_config", [1]),
])
def test_wrong_config_types_name_the_key(tmp_path, where, value):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)

    def edit(data):
        *sections, key = where.split(".")
        for section in sections:
            data = data[section]
        data[key] = value

    _without_nvlm_config(tmp_path, edit)
    with pytest.raises(ValueError, match=re.escape(where)):
        NVLM.from_pretrained(tmp_path, image_token_id=259)


@pytest.mark.parametrize("field, value", [("llm.num_layers", "3"), ("vision.norm_eps", "x"),
                                          ("max_tiles", [6]), ("xattn_layers", "0"),
                                          ("llm", 3), ("image_token_id", 2.5)])
def test_wrong_saved_config_types_name_the_field(tmp_path, field, value):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)

    def edit(data):
        data = data["nvlm_config"]
        *parts, key = field.split(".")
        for part in parts:
            data = data[part]
        data[key] = value

    _edit_config_json(tmp_path, edit)
    with pytest.raises(ValueError, match=re.escape(f"nvlm_config.{field}")):
        NVLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("part, field", [("vision", "num_heads"), ("llm", "num_kv_heads")])
def test_zero_sizes_in_a_saved_config_name_the_field(tmp_path, part, field):
    _model(VARIANTS["tiny"]).save_pretrained(tmp_path)
    _edit_config_json(tmp_path, lambda data: data["nvlm_config"][part].update({field: 0}))
    with pytest.raises(ValueError, match=re.escape(f"nvlm_config: {part}.{field}: expected >= 1")):
        NVLM.from_pretrained(tmp_path)

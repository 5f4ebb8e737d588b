"""Checkpoints in the layout of the public NVLM-D-72B and InternVL2 ("InternVL-chat") releases.

    model = load_pretrained("NVLM-D-72B", dtype=torch.bfloat16, device="cuda")
    save_pretrained(model, "out/")      # same layout; loading "out/" gives every tensor back

A checkpoint directory holds
- config.json: `vision_config` (InternViT keys), `llm_config` (a Hugging Face Qwen2 or Llama
  config), `downsample_ratio`, `ps_version`, `select_layer`, `use_thumbnail`, `max_dynamic_patch`,
  and, when written here, our whole NVLMConfig under "nvlm_config" (for what the layout above
  cannot say: thumbnail tag, image token id, projector LayerNorm eps);
- the weights: `model.safetensors`, or shards listed by `model.safetensors.index.json`.
  Only safetensors are read: pickle files (`.bin`, `.pt`) can run code when loaded.

A checkpoint is untrusted input. Before any model is built, its config's sizes are compared with the
tensor headers (a config may claim 10**9 layers), the index may only name files in the directory,
and the tensor dtypes are checked; the weights are checked to be finite as they are read. Every
problem is a ValueError (OSError for a missing file) that names the file, key or tensor.

Tensor names are NVLM's parameter names. The two places where the layouts differ (zero-padded ViT
heads, a tied lm_head) live in InternVLChatAdapter. Shapes the config cannot tell come from the
tensors: the projector's width, bias and depth, and the number of dummy heads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LLMConfig, NVLMConfig, ProjectorConfig, VisionConfig
from .errors import InputError
from .files import atomic_directory
from .model import NVLM
from .tokenizer import find_image_token_id

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
NVLM_CONFIG_KEY = "nvlm_config"
EMBED_TOKENS = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
VISION_LAYERS = "vision_model.encoder.layers."
LLM_LAYERS = "language_model.model.layers."
XATTN_BLOCKS = "xattn."
# config.json and the index are a few kB to a few MB; anything far larger is not a checkpoint's.
MAX_JSON_BYTES = 64 * 2**20
# How many tensor names an error message lists before it says "and N more".
LISTED_NAMES = 8

Shape = tuple[int, ...]

# ViT attention tensors that carry one slice per head, and so the checkpoint's dummy heads.
_PER_HEAD_TENSOR = re.compile(
    r"vision_model\.encoder\.layers\.\d+\.attn\.(qkv\.weight|qkv\.bias|proj\.weight|"
    r"q_norm\.weight|k_norm\.weight)")


# --------------------------------------------------------------------------------------------
# Public API

def load_pretrained(path: str | os.PathLike, image_token_id: int | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    max_tiles: int | None = None, check_weights: bool = True) -> NVLM:
    """Read an NVLM-D / InternVL-chat checkpoint directory into an NVLM (in eval mode).

    The model is built on the meta device and takes the checkpoint's tensors as its parameters
    (no random init first), in the checkpoint's dtype unless `dtype` is given. image_token_id:
    the argument, else the saved nvlm_config's, else the id of `<|vision_pad|>` / `<IMG_CONTEXT>`
    in the directory's tokenizer files. max_tiles: the argument, else nvlm_config's, else
    config.json's `max_dynamic_patch`. A checkpoint whose tensors do not match its config raises
    one ValueError that lists every missing, unexpected and mis-shaped tensor; sizes that the
    tensor headers contradict (layer counts, widths, vocabulary) are refused before any model is
    built. check_weights: refuse non-floating tensors, floating tensors of mixed dtypes (unless
    `dtype` casts them all to one), and NaN or infinite values (after that cast); False loads
    them as they are.
    """
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r}: no config.json (expected a checkpoint "
                                "directory in the NVLM-D / InternVL-chat layout)")
    data = _read_json(config_path)
    files = _weight_files(directory)
    shapes, dtypes = _tensor_headers(files)

    config = config_from_checkpoint(data, shapes)
    if max_tiles is not None:
        config.max_tiles = max_tiles
    config.image_token_id = _resolve_image_token_id(image_token_id, data, directory)
    config.validate()
    problems = _size_mismatches(config, shapes)
    if problems:
        raise InputError(f"checkpoint {str(directory)!r}: config.json disagrees with the tensor "
                         "headers:\n" + "\n".join(problems))
    if check_weights:
        _check_dtypes(dtypes, dtype, directory)

    with torch.device("meta"):
        model = NVLM(config)
    adapter = InternVLChatAdapter(config)
    expected = {name: tuple(t.shape)
                for name, t in adapter.to_checkpoint(model.state_dict()).items()}
    optional = {LM_HEAD: expected[EMBED_TOKENS]} if config.llm.tie_word_embeddings else {}
    problems = _layout_mismatches(expected, shapes, optional)
    if problems:
        raise InputError(f"checkpoint {str(directory)!r} does not match the model its config.json "
                         "describes:\n" + "\n".join(problems))

    tensors, finite = _read_tensors(files, dtype, device, check_weights)
    _check_finite(finite, dtype, directory)
    state_dict, problems = adapter.from_checkpoint(tensors)
    if problems:
        raise InputError(f"checkpoint {str(directory)!r}:\n" + "\n".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def save_pretrained(model: NVLM, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` in the layout load_pretrained reads: config.json and one model.safetensors,
    or shards of at most max_shard_bytes (a larger single tensor gets a shard of its own) plus
    model.safetensors.index.json.

    Atomic: everything is written into a temporary sibling directory that is then renamed to
    `path`; an existing directory at `path` (and everything in it) is replaced only once the new
    one is complete.
    """
    if max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes: expected > 0, got {max_shard_bytes}")
    config = model.config
    state_dict = {name: t.detach() for name, t in model.state_dict().items()}
    tensors = InternVLChatAdapter(config).to_checkpoint(state_dict)
    shards = _plan_shards(tensors, max_shard_bytes)
    torch_dtype = str(state_dict[EMBED_TOKENS].dtype).removeprefix("torch.")

    with atomic_directory(Path(path)) as tmp:
        (tmp / CONFIG_FILE).write_text(
            json.dumps(checkpoint_config_json(config, torch_dtype), indent=2) + "\n",
            encoding="utf-8")
        for file, names in shards.items():
            save_file({name: tensors[name].contiguous().cpu() for name in names}, tmp / file,
                      metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                     "weight_map": {name: file for file, names in shards.items() for name in names}}
            (tmp / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n",
                                                      encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The state-dict adapter

class InternVLChatAdapter:
    """NVLM state dict <-> InternVL-chat / NVLM-D checkpoint tensors. Names are the same on both
    sides; the layouts differ in two places only:

    - dummy heads (NVLM-D-72B pads InternViT's 25 heads to 32 for 8-way tensor parallelism): per
      ViT layer the checkpoint's qkv is ((3 * (H + h) * d), C) with each of q, k, v holding the H
      real heads first and h all-zero heads after them (its bias likewise), proj is (C, (H + h) * d)
      with zero columns for the dummy heads, and q_norm / k_norm weights have (H + h) * d entries.
      NVLM holds the real heads only: its q/k RMSNorm over the C real dims equals the checkpoint's,
      whose variance covers only those dims. Stripped on load, zero-filled on save.
    - tied embeddings: NVLM has no lm_head then; a checkpoint may still carry one, accepted only
      if it equals the embedding table.
    """

    def __init__(self, config: NVLMConfig) -> None:
        vision = config.vision
        self.width = vision.hidden_size
        self.dummy_width = vision.num_dummy_heads * vision.head_dim
        self.tied = config.llm.tie_word_embeddings

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (dummy heads added as zeros). Works on meta tensors, which gives the
        shapes a checkpoint must have."""
        if not self.dummy_width:
            return dict(state_dict)
        return {name: self._pad(name, t) if _PER_HEAD_TENSOR.fullmatch(name) else t
                for name, t in state_dict.items()}

    def from_checkpoint(self, tensors: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """NVLM's state dict from checkpoint tensors of the expected shapes, and the problems that
        make them unusable (nonzero dummy heads, a tied lm_head unequal to the embeddings)."""
        state_dict, problems = dict(tensors), []
        if self.tied and LM_HEAD in state_dict:
            lm_head = state_dict.pop(LM_HEAD)
            if not torch.equal(lm_head, state_dict[EMBED_TOKENS]):
                problems.append(f"  {LM_HEAD}: the config ties the output projection to "
                                f"{EMBED_TOKENS}, but the checkpoint's lm_head differs from it")
        if self.dummy_width:
            for name, t in tensors.items():
                if _PER_HEAD_TENSOR.fullmatch(name):
                    state_dict[name], dummy = self._strip(name, t)
                    # The q/k-norm weights of dummy heads scale zeros: any value is harmless.
                    if "norm" not in name and bool(dummy.any()):
                        problems.append(f"  {name}: the dummy heads' entries must be zero (they "
                                        f"would change the outputs); {int(dummy.count_nonzero())} "
                                        "are not")
        return state_dict, problems

    def _pad(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if ".qkv." in name:      # (3C, ...) -> (3, C + dummy, ...): zeros after each of q, k, v
            per_part = t.unflatten(0, (3, self.width))
            zeros = per_part.new_zeros(3, self.dummy_width, *per_part.shape[2:])
            return torch.cat([per_part, zeros], dim=1).flatten(0, 1)
        if ".proj." in name:     # (C, C) -> (C, C + dummy): zero input columns
            return torch.cat([t, t.new_zeros(t.shape[0], self.dummy_width)], dim=1)
        return torch.cat([t, t.new_zeros(self.dummy_width)])      # q_norm / k_norm

    def _strip(self, name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the real heads' part, the dummy heads' part) of a per-head tensor."""
        c = self.width
        if ".qkv." in name:
            per_part = t.unflatten(0, (3, c + self.dummy_width))
            return per_part[:, :c].flatten(0, 1).contiguous(), per_part[:, c:]
        if ".proj." in name:
            return t[:, :c].contiguous(), t[:, c:]
        return t[:c].clone(), t[c:]


# --------------------------------------------------------------------------------------------
# config.json <-> NVLMConfig

def config_from_checkpoint(data: dict[str, Any], shapes: dict[str, Shape]) -> NVLMConfig:
    """NVLMConfig from a checkpoint's config.json and its tensor shapes (the tensors decide the
    projector and the dummy heads). image_token_id stays the default: load_pretrained sets it.
    With an "nvlm_config" section, the fields the layout cannot express come from it, and the
    rest must agree with what config.json and the tensors say. Values of the wrong JSON type
    raise a InputError naming their key."""
    if not isinstance(data, dict):
        raise InputError(f"{CONFIG_FILE}: expected a JSON object, got {type(data).__name__}")
    image_size = _check_image_pipeline(data)
    vision = _vision_config(_section(data, "vision_config"), shapes, image_size)
    llm = _llm_config(_section(data, "llm_config"), shapes)
    projector = _projector_config(data, shapes, llm)
    config = NVLMConfig(vision=vision, llm=llm, projector=projector,
                        use_thumbnail=_flag(data, "use_thumbnail", CONFIG_FILE, True))
    # NVLM-D-72B's config.json says 12, an InternVL leftover: NVLM trains and evaluates with 6
    # (docs/nvlm.md section 2), so its checkpoints keep the default; other InternVL-chat models keep
    # their own value.
    if "max_dynamic_patch" in data and data.get("model_type") != "NVLM_D":
        config.max_tiles = _int(data, "max_dynamic_patch", CONFIG_FILE)
    if NVLM_CONFIG_KEY in data:
        config = _merge_saved_config(config, _saved_config(data[NVLM_CONFIG_KEY]))
    return config


def checkpoint_config_json(config: NVLMConfig, torch_dtype: str) -> dict[str, Any]:
    """config.json in the InternVL-chat layout, with our whole config under "nvlm_config"."""
    v, llm, p = config.vision, config.llm, config.projector
    # The architecture names only inform other tools (this loader reads the keys below): the
    # bias-free projector is NVLM-D-72B's, the biased one InternVL2's.
    nvlm_d_style = not p.bias
    vision_json = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size, "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": 3, "intermediate_size": v.intermediate_size,
        "num_attention_heads": v.num_heads, "num_dummy_heads": v.num_dummy_heads,
        "num_hidden_layers": v.num_layers, "hidden_act": "gelu", "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps, "qk_normalization": v.qk_normalization,
        "qkv_bias": v.qkv_bias, "initializer_factor": v.layerscale_init,
    }
    # Llama's attention_bias also adds an o_proj bias, so biased q/k/v can only be Qwen2, and
    # bias-free ones only Llama (Qwen2 always has them).
    family = ("Qwen2ForCausalLM", "qwen2") if llm.attention_bias else ("LlamaForCausalLM", "llama")
    llm_json = {
        "architectures": [family[0]], "model_type": family[1], "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "hidden_act": "silu",
        "rope_theta": llm.rope_theta, "rms_norm_eps": llm.rms_norm_eps,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "max_position_embeddings": llm.max_position_embeddings, "torch_dtype": torch_dtype,
    }
    if not llm.attention_bias:
        llm_json.update(attention_bias=False, mlp_bias=False)
    # NVLM-X/H have no public checkpoints (and no other tool reads them): name them for what
    # they are rather than as an InternVL-chat model they are not.
    if config.arch != "D":
        name = model_type = f"NVLM_{config.arch}"
    else:
        name, model_type = (("NVLM_D", "NVLM_D") if nvlm_d_style
                            else ("InternVLChatModel", "internvl_chat"))
    return {
        "architectures": [name],
        "model_type": model_type,
        "torch_dtype": torch_dtype,
        "downsample_ratio": 1 / p.downsample_scale, "ps_version": "v2", "select_layer": -1,
        "template": "chatml", "force_image_size": v.image_size, "dynamic_image_size": True,
        "use_thumbnail": config.use_thumbnail, "min_dynamic_patch": 1,
        "max_dynamic_patch": config.max_tiles,
        "vision_config": vision_json, "llm_config": llm_json,
        NVLM_CONFIG_KEY: config.to_dict(),
    }


def _check_image_pipeline(data: dict[str, Any]) -> int | None:
    """Refuse the image paths this model does not implement; returns force_image_size."""
    if "ps_version" not in data:
        raise InputError("config.json: no 'ps_version' (InternVL's default is 'v1', whose pixel "
                         "shuffle transposes the token grid; only 'v2' is supported)")
    if data["ps_version"] != "v2":
        raise InputError(f"config.json: ps_version {data['ps_version']!r} is not supported, only "
                         "'v2' (the 'v1' pixel shuffle transposes the token grid; docs/nvlm.md "
                         "section 4)")
    if data.get("select_layer", -1) != -1:
        raise InputError(f"config.json: select_layer {data['select_layer']!r} is not supported, "
                         "only -1 (the ViT's last layer)")
    force = data.get("force_image_size")
    return None if force is None else _side(force, f"{CONFIG_FILE} force_image_size")


def _vision_config(v: dict[str, Any], shapes: dict[str, Shape], force_image_size: int | None
                   ) -> VisionConfig:
    where = "config.json vision_config"
    image_size = _side(_key(v, "image_size", where), f"{where}.image_size")
    if force_image_size is not None and force_image_size != image_size:
        raise InputError(f"config.json: force_image_size {force_image_size} differs from "
                         f"vision_config.image_size {image_size}; interpolating the ViT position "
                         "embeddings to another tile size is not supported")
    if v.get("hidden_act", "gelu") != "gelu":
        raise InputError(f"{where}.hidden_act: expected 'gelu', got {v['hidden_act']!r}")
    width, heads = _int(v, "hidden_size", where), _int(v, "num_attention_heads", where)
    layer0 = VISION_LAYERS + "0."
    # Flags a config leaves out are read off the tensors (LayerNorm has a bias, RMSNorm not).
    norm_type = v.get("norm_type", "layer_norm" if layer0 + "norm1.bias" in shapes else "rms_norm")
    return VisionConfig(
        image_size=image_size,
        patch_size=_side(_key(v, "patch_size", where), f"{where}.patch_size"),
        hidden_size=width, num_layers=_int(v, "num_hidden_layers", where), num_heads=heads,
        intermediate_size=_int(v, "intermediate_size", where),
        norm_type=norm_type, norm_eps=_float(v, "layer_norm_eps", where, 1e-6),
        qk_normalization=_flag(v, "qk_normalization", where,
                               layer0 + "attn.q_norm.weight" in shapes),
        qkv_bias=_flag(v, "qkv_bias", where, layer0 + "attn.qkv.bias" in shapes),
        layerscale_init=_float(v, "initializer_factor", where, 0.1),
        num_dummy_heads=_num_dummy_heads(v, shapes, width, heads))


def _num_dummy_heads(v: dict[str, Any], shapes: dict[str, Shape], width: int, heads: int) -> int:
    """From the first qkv weight's rows, 3 * (heads + dummy) * head_dim; a `num_dummy_heads` key
    must agree. If the rows do not fit that form the shape check reports the tensor."""
    where = "config.json vision_config"
    declared = _int(v, "num_dummy_heads", where, None, minimum=0)
    qkv = shapes.get(VISION_LAYERS + "0.attn.qkv.weight")
    head_dim = width // heads
    if (qkv is None or not qkv or head_dim == 0 or qkv[0] % (3 * head_dim)
            or qkv[0] // (3 * head_dim) < heads):
        return declared or 0
    inferred = qkv[0] // (3 * head_dim) - heads
    if declared is not None and declared != inferred:
        raise InputError(f"{where}.num_dummy_heads {declared} disagrees with the "
                         f"checkpoint's qkv weight {tuple(qkv)}: that is {heads} heads of "
                         f"{head_dim} plus {inferred} dummy heads")
    return inferred


def _llm_config(llm: dict[str, Any], shapes: dict[str, Shape]) -> LLMConfig:
    where = "config.json llm_config"
    architectures = llm.get("architectures") or []
    if not isinstance(architectures, list):
        raise InputError(f"{where}.architectures: expected a list of names, got {architectures!r}")
    model_type = llm.get("model_type")
    if model_type == "qwen2" or "Qwen2ForCausalLM" in architectures:
        family = "qwen2"
    elif model_type == "llama" or "LlamaForCausalLM" in architectures:
        family = "llama"
    else:
        raise InputError(f"{where}: only Qwen2 and Llama decoders are supported, got model_type "
                         f"{model_type!r}, architectures {architectures}")
    if llm.get("hidden_act", "silu") != "silu":
        raise InputError(f"{where}.hidden_act: expected 'silu', got {llm['hidden_act']!r}")
    if llm.get("use_sliding_window"):
        raise InputError(f"{where}.use_sliding_window: sliding-window attention is not supported")
    if llm.get("mlp_bias"):
        raise InputError(f"{where}.mlp_bias: MLP biases are not supported")
    # Qwen2 always has q/k/v biases; Llama's attention_bias would also bias o_proj, which this
    # decoder does not have.
    if family == "llama" and llm.get("attention_bias"):
        raise InputError(f"{where}.attention_bias: a Llama decoder with attention biases also "
                         "has an o_proj bias, which is not supported")
    width = _int(llm, "hidden_size", where)
    heads = _int(llm, "num_attention_heads", where)
    if llm.get("head_dim") not in (None, width // heads):
        raise InputError(f"{where}.head_dim: expected hidden_size / num_attention_heads = "
                         f"{width // heads}, got {llm['head_dim']!r}")
    return LLMConfig(
        vocab_size=_int(llm, "vocab_size", where), hidden_size=width,
        num_layers=_int(llm, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=_int(llm, "num_key_value_heads", where, heads),
        intermediate_size=_int(llm, "intermediate_size", where),
        rope_theta=_rope_theta(llm, where), rms_norm_eps=_float(llm, "rms_norm_eps", where, 1e-6),
        attention_bias=family == "qwen2",
        tie_word_embeddings=_flag(llm, "tie_word_embeddings", where, LM_HEAD not in shapes),
        max_position_embeddings=_int(llm, "max_position_embeddings", where, 32768))


def _rope_theta(llm: dict[str, Any], where: str) -> float:
    """rope_theta (transformers 4) or rope_parameters.rope_theta (transformers 5); only the
    default (unscaled) RoPE is supported."""
    sections = {key: llm.get(key) or {} for key in ("rope_parameters", "rope_scaling")}
    for key, section in sections.items():
        if not isinstance(section, dict):
            raise InputError(f"{where}.{key}: expected an object, got {section!r}")
        kind = section.get("rope_type", section.get("type", "default"))
        if kind != "default":
            raise InputError(f"{where}.{key}: only the default RoPE is supported, got {kind!r}")
    if "rope_theta" in sections["rope_parameters"]:
        return _float(sections["rope_parameters"], "rope_theta", f"{where}.rope_parameters")
    return _float(llm, "rope_theta", where, 10000.0)


def _projector_config(data: dict[str, Any], shapes: dict[str, Shape], llm: LLMConfig
                      ) -> ProjectorConfig:
    """mlp1's depth, width and bias from its tensors: mlp1.3 exists for two Linears, mlp1.1's rows
    are the hidden width (the LLM's MLP width for NVLM-D-72B, its hidden width for InternVL2)."""
    ratio = _float(data, "downsample_ratio", CONFIG_FILE, 0.5)
    # 1 / a subnormal ratio is inf, which round() refuses.
    scale = round(1 / ratio) if ratio > 0 and math.isfinite(1 / ratio) else 0
    if scale < 1 or abs(scale * ratio - 1) > 1e-6:
        raise InputError(f"config.json: downsample_ratio must be 1 / an integer, got {ratio}")
    first = shapes.get("mlp1.1.weight")
    two_layers = "mlp1.3.weight" in shapes
    # With one Linear there is no hidden width: the field then just holds the LLM width.
    hidden = first[0] if first is not None and two_layers else llm.hidden_size
    return ProjectorConfig(hidden_size=hidden, bias="mlp1.1.bias" in shapes,
                           num_layers=2 if two_layers else 1, downsample_scale=scale)


# Fields of a saved NVLMConfig that config.json's InternVL layout cannot express.
_FROM_SAVED_CONFIG = ("arch", "image_token_id", "max_tiles", "thumbnail_tag", "tile_tags",
                      "xattn_layers")


def _merge_saved_config(derived: NVLMConfig, saved: NVLMConfig) -> NVLMConfig:
    """The derived config with the saved one's extra fields; every other field must agree."""
    projector_extras = {"layernorm_eps": saved.projector.layernorm_eps}
    if derived.projector.num_layers == 1:      # the hidden width is unused with one Linear
        projector_extras["hidden_size"] = saved.projector.hidden_size
    differences = []
    for part in ("vision", "llm", "projector"):
        theirs = dataclasses.asdict(getattr(saved, part))
        for field, value in dataclasses.asdict(getattr(derived, part)).items():
            if not (part == "projector" and field in projector_extras) and theirs[field] != value:
                differences.append(f"  {part}.{field}: {theirs[field]!r} in nvlm_config, {value!r} "
                                   "from config.json and the tensors")
    if saved.use_thumbnail != derived.use_thumbnail:
        differences.append(f"  use_thumbnail: {saved.use_thumbnail!r} in nvlm_config, "
                           f"{derived.use_thumbnail!r} in config.json")
    if differences:
        raise InputError("config.json: the saved nvlm_config disagrees with the checkpoint:\n"
                         + "\n".join(differences))
    return dataclasses.replace(
        derived, projector=dataclasses.replace(derived.projector, **projector_extras),
        **{field: getattr(saved, field) for field in _FROM_SAVED_CONFIG})


def _resolve_image_token_id(argument: int | None, data: dict[str, Any], directory: Path) -> int:
    if argument is not None:
        return int(argument)
    saved = data.get(NVLM_CONFIG_KEY) or {}
    if "image_token_id" in saved:
        return int(saved["image_token_id"])
    found = find_image_token_id(directory)
    if found is None:
        raise InputError(f"{str(directory)!r}: no image token id: neither an nvlm_config in "
                         "config.json nor `<|vision_pad|>` / `<IMG_CONTEXT>` in tokenizer files; "
                         "pass image_token_id=")
    return found


def _saved_config(section: Any) -> NVLMConfig:
    """The "nvlm_config" section as an NVLMConfig; type errors name the field."""
    where = f"{CONFIG_FILE} {NVLM_CONFIG_KEY}"
    _check_field_types(section, NVLMConfig, where)
    try:
        return NVLMConfig.from_dict(section)
    except ValueError as error:
        raise InputError(f"{where}: {error}") from error


def _check_field_types(section: Any, cls: type, where: str) -> None:
    """Each field present has the JSON type of its default (a nested part: an object): the
    config's own validation compares and divides, and a string there fails obscurely."""
    if not isinstance(section, dict):
        raise InputError(f"{where}: expected an object, got {section!r}")
    defaults = cls()
    for field in dataclasses.fields(cls):
        if field.name not in section:
            continue
        value, default = section[field.name], getattr(defaults, field.name)
        name = f"{where}.{field.name}"
        if dataclasses.is_dataclass(default):
            _check_field_types(value, type(default), name)
        elif not _json_type_matches(value, default):
            raise InputError(f"{name}: expected a value like {default!r}, got {value!r}")


def _json_type_matches(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(default, str):
        return isinstance(value, type(default))
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):                # xattn_layers: a list of layer indices
        return isinstance(value, (list, tuple)) and all(_is_int(i) for i in value)
    return True


def _is_int(value: Any) -> bool:
    # bool is an int in Python, but a JSON true where a number belongs is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    section = data.get(key)
    if not isinstance(section, dict):
        raise InputError(f"config.json: expected a {key!r} object (the InternVL-chat layout), "
                         f"got {type(section).__name__}")
    return section


def _key(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise InputError(f"{where}: missing {key!r}")
    return section[key]


def _key_name(where: str, key: str) -> str:
    """A key's name in messages: config.json llm_config.vocab_size in a section, config.json
    max_dynamic_patch at the top level."""
    return f"{where} {key}" if where == CONFIG_FILE else f"{where}.{key}"


# A required key: no default given. null counts as absent (Hugging Face writes it for defaults).
_REQUIRED = object()


def _int(section: dict[str, Any], key: str, where: str, default: Any = _REQUIRED,
         minimum: int = 1) -> int | None:
    """section[key], an integer >= minimum; absent or null: `default` (returned as it is)."""
    value = _key(section, key, where) if default is _REQUIRED else section.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if not _is_int(value) or value < minimum:
        raise InputError(f"{_key_name(where, key)}: expected an integer >= {minimum}, "
                         f"got {value!r}")
    return value


def _float(section: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> float:
    """section[key], a finite number; absent or null: `default`."""
    value = _key(section, key, where) if default is _REQUIRED else section.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value)):
        raise InputError(f"{_key_name(where, key)}: expected a finite number, got {value!r}")
    return float(value)


def _flag(section: dict[str, Any], key: str, where: str, default: bool) -> bool:
    """section[key], true or false (not a string, whose bool() is True even for "false")."""
    value = section.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InputError(f"{_key_name(where, key)}: expected true or false, got {value!r}")
    return value


def _side(value: Any, where: str) -> int:
    """A square size given as an int or [h, w]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise InputError(f"{where}: expected a square size, got {value!r}")
        value = value[0]
    if not _is_int(value) or value < 1:
        raise InputError(f"{where}: expected a size >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Files

def _read_json(path: Path) -> Any:
    """The file's JSON; a file that is not (UTF-8) JSON is a ValueError that names it."""
    with open(path, "rb") as file:       # read to the bound, not to the (maybe special) end
        raw = file.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{str(path)!r}: more than the {MAX_JSON_BYTES} bytes a checkpoint's "
                         "JSON file may have")
    try:
        return json.loads(raw.decode("utf-8"))
    # Decode errors are ValueErrors that do not name the file; deep nesting overflows the parser.
    except (ValueError, RecursionError) as error:
        raise InputError(f"{str(path)!r}: not valid UTF-8 JSON: {error}") from error


def _weight_files(directory: Path) -> dict[Path, list[str]]:
    """safetensors file -> the tensor names it holds (from the index when sharded)."""
    single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX_FILE
    if single.is_file():
        with _open_safetensors(single) as reader:
            return {single: list(reader.keys())}
    if index.is_file():
        return _indexed_files(directory, index)
    pickles = sorted(p.name for p in directory.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".pkl")
                     or p.name.endswith(".bin.index.json"))
    if pickles:
        raise InputError(f"{str(directory)!r}: only safetensors checkpoints are read, found "
                         f"{pickles}. Pickle files can run arbitrary code when loaded; convert "
                         "them once with safetensors.torch.save_file(torch.load(file, "
                         "weights_only=True), ...) from a source you trust")
    raise FileNotFoundError(
        f"{str(directory)!r}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}")


def _indexed_files(directory: Path, index: Path) -> dict[Path, list[str]]:
    """The index's weight_map as shard file -> tensor names. Every entry is checked before any
    shard is opened: an index may only name files in the checkpoint directory."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{str(index)!r}: expected a JSON object with a 'weight_map' object")
    files: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        if not _is_plain_file_name(file):
            raise InputError(f"{str(index)!r}: weight_map entry {name!r} -> {file!r}: expected "
                             "the name of a file in the checkpoint directory (no directories, "
                             "no absolute path)")
        files.setdefault(directory / file, []).append(name)
    for file in files:
        # A symbolic link in the directory may point elsewhere: the Hugging Face cache links
        # every snapshot file to a blob.
        if not file.is_file():
            raise FileNotFoundError(
                f"{str(file)!r}: listed in {SAFETENSORS_INDEX_FILE} but absent")
    return files


def _is_plain_file_name(file: Any) -> bool:
    return (isinstance(file, str) and file not in ("", ".", "..") and "\0" not in file
            and os.path.basename(file) == file
            and not (os.altsep and os.altsep in file))


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    """safe_open on the CPU; a damaged file's error becomes a ValueError that names the file.
    safetensors checks the header before reading it (at most 100 MB, offsets that tile the
    file), so a damaged header cannot make it allocate more than that."""
    try:
        with safe_open(file, framework="pt", device="cpu") as reader:
            yield reader
    except SafetensorError as error:
        raise InputError(f"{str(file)!r}: not a valid safetensors file: {error}") from error


def _tensor_headers(files: dict[Path, list[str]]) -> tuple[dict[str, Shape], dict[str, str]]:
    """Shapes and dtypes (safetensors' names: "F32", "BF16", "I64", ...) from the safetensors
    headers, without reading any data."""
    shapes: dict[str, Shape] = {}
    dtypes: dict[str, str] = {}
    for file, names in files.items():
        with _open_safetensors(file) as reader:
            absent = sorted(set(names) - set(reader.keys()))
            if absent:
                raise InputError(f"{str(file)!r} lacks tensors the index places in it: "
                                 f"{_listed(absent)}")
            for name in names:
                header = reader.get_slice(name)
                shapes[name], dtypes[name] = tuple(header.get_shape()), header.get_dtype()
    return shapes, dtypes


def _read_tensors(files: dict[Path, list[str]], dtype: torch.dtype | None,
                  device: str | torch.device, check_finite: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors on `device` (floating ones cast to `dtype` when given) and, with
    check_finite, a 0-d bool tensor per name that says whether all its values are finite."""
    tensors, finite = {}, {}
    for file, names in files.items():
        with _open_safetensors(file) as reader:
            for name in names:
                tensor = reader.get_tensor(name)
                as_dtype = dtype if dtype is not None and tensor.is_floating_point() else None
                tensors[name] = tensor = tensor.to(device=device, dtype=as_dtype)
                if check_finite:
                    finite[name] = _all_finite(tensor)
    return tensors, finite


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on t's device, so that a GPU load syncs once for all tensors, not once
    per tensor. Checked after the cast: a float32 1e6 is inf in float16."""
    if t.is_floating_point() and t.element_size() == 1:
        t = t.half()            # isfinite has no float8 kernels; float8 -> float16 is exact
    return torch.isfinite(t).all()


# --------------------------------------------------------------------------------------------
# Checks on untrusted checkpoints

def _size_mismatches(config: NVLMConfig, shapes: dict[str, Shape]) -> list[str]:
    """One line per size of the config that the tensor headers contradict, found before any
    model is built: the layer counts bound what building costs (a config may claim 10**9 layers;
    a checkpoint holds at most one layer per tensor), the widths get a message that names the
    config key. A tensor that is absent is not compared here: the full comparison of every
    tensor's name and shape, after the model is built, reports it."""
    return _layer_count_mismatches(config, shapes) + _width_mismatches(config, shapes)


def _layer_count_mismatches(config: NVLMConfig, shapes: dict[str, Shape]) -> list[str]:
    lines = []
    for key, declared, prefix in (
            ("vision_config.num_hidden_layers", config.vision.num_layers, VISION_LAYERS),
            ("llm_config.num_hidden_layers", config.llm.num_layers, LLM_LAYERS)):
        found = len(_layer_indices(shapes, prefix))
        if declared != found:
            lines.append(f"  {key}: {declared} in config.json, but the checkpoint has {found} "
                         f"layers ({prefix}N.*)")
    declared = sorted(str(i) for i in config.xattn_layers)
    found = sorted(_layer_indices(shapes, XATTN_BLOCKS), key=lambda index: (len(index), index))
    if set(declared) != set(found):
        lines.append(f"  {NVLM_CONFIG_KEY}.xattn_layers: {list(config.xattn_layers)} (arch "
                     f"{config.arch!r}), but the checkpoint's X-attn blocks ({XATTN_BLOCKS}N.*) "
                     f"are [{_listed(found, separator=', ')}]")
    return lines


def _layer_indices(shapes: dict[str, Shape], prefix: str) -> set[str]:
    """The N of every `prefix`N.* tensor name, kept as text: int() of a 5000-digit N raises."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {match.group(1) for name in shapes if (match := pattern.match(name))}


def _width_mismatches(config: NVLMConfig, shapes: dict[str, Shape]) -> list[str]:
    v, llm = config.vision, config.llm
    patch = "vision_model.embeddings.patch_embedding.weight"
    # (config key, its value, a tensor, a dimension of it, the size the value gives that dimension)
    expectations = [
        ("vision_config.hidden_size", v.hidden_size, patch, 0, v.hidden_size),
        ("vision_config.patch_size", v.patch_size, patch, 2, v.patch_size),
        ("vision_config.image_size", v.image_size, "vision_model.embeddings.position_embedding",
         1, v.grid_size ** 2 + 1),
        ("vision_config.intermediate_size", v.intermediate_size,
         VISION_LAYERS + "0.mlp.fc1.weight", 0, v.intermediate_size),
        ("downsample_ratio", 1 / config.projector.downsample_scale, "mlp1.0.weight", 0,
         v.hidden_size * config.projector.downsample_scale ** 2),
        ("llm_config.vocab_size", llm.vocab_size, EMBED_TOKENS, 0, llm.vocab_size),
        ("llm_config.hidden_size", llm.hidden_size, EMBED_TOKENS, 1, llm.hidden_size),
        ("llm_config.intermediate_size", llm.intermediate_size,
         LLM_LAYERS + "0.mlp.gate_proj.weight", 0, llm.intermediate_size),
        ("llm_config.num_key_value_heads", llm.num_kv_heads,
         LLM_LAYERS + "0.self_attn.k_proj.weight", 0, llm.num_kv_heads * llm.head_dim),
    ]
    lines = []
    for key, value, tensor, dim, size in expectations:
        shape = shapes.get(tensor)
        if shape is None or len(shape) <= dim or shape[dim] == size:
            continue
        gives = "" if size == value else f", which makes {size}"
        lines.append(f"  {key}: {value} in config.json{gives}, but the checkpoint's {tensor} "
                     f"has {shape[dim]} in dimension {dim} (shape {shape})")
    return lines


def _check_dtypes(dtypes: dict[str, str], dtype: torch.dtype | None, directory: Path) -> None:
    """Every tensor floating and, unless `dtype` casts them all to one, all of one dtype: a
    model of mixed dtypes loads, then fails at its first matmul."""
    # safetensors' floating dtypes: F64 ... F4, F8_E4M3, BF16; the others are I*, U*, BOOL.
    non_floating = sorted(name for name, d in dtypes.items() if not d.startswith(("F", "BF")))
    if non_floating:
        raise InputError(f"checkpoint {str(directory)!r}: every weight must be floating point; "
                         f"these are not: {_listed(non_floating, dtypes)}")
    counts = Counter(dtypes.values())
    if dtype is None and len(counts) > 1:
        common = counts.most_common(1)[0][0]
        odd = sorted(name for name, d in dtypes.items() if d != common)
        raise InputError(f"checkpoint {str(directory)!r}: tensors of mixed dtypes "
                         f"({dict(counts.most_common())}); not {common}: {_listed(odd, dtypes)}. "
                         "Pass dtype= to cast them all to one (check_weights=False loads them as "
                         "they are)")


def _check_finite(finite: dict[str, torch.Tensor], dtype: torch.dtype | None,
                  directory: Path) -> None:
    if not finite:
        return
    flags = torch.stack(list(finite.values())).tolist()          # the one host sync
    bad = [name for name, ok in zip(finite, flags) if not ok]
    if bad:
        cast = f" after the cast to {dtype}" if dtype is not None else ""
        raise InputError(f"checkpoint {str(directory)!r}: {_listed(bad)}: not finite (NaN or "
                         f"infinite values){cast}; check_weights=False loads them anyway")


def _listed(names: list[str], dtypes: dict[str, str] | None = None, separator: str = "; ") -> str:
    """The first LISTED_NAMES names (with their dtypes when given), then how many more."""
    shown = [f"{name} ({dtypes[name]})" if dtypes else name for name in names[:LISTED_NAMES]]
    more = f"{separator}and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
    return separator.join(shown) + more


def _layout_mismatches(expected: dict[str, Shape], found: dict[str, Shape],
                       optional: dict[str, Shape]) -> list[str]:
    """One line per missing, unexpected or mis-shaped tensor (none when the layouts agree)."""
    allowed = {**expected, **optional}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(allowed))
    wrong = sorted(name for name in set(found) & set(allowed) if found[name] != allowed[name])
    lines = []
    if missing:
        lines.append(f"  missing ({len(missing)}):")
        lines += [f"    {name}: expected {expected[name]}" for name in missing]
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}):")
        lines += [f"    {name}: found {found[name]}" for name in unexpected]
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}):")
        lines += [f"    {name}: expected {allowed[name]}, found {found[name]}" for name in wrong]
    return lines


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor names, filled in order up to max_shard_bytes each."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + _nbytes(t) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += _nbytes(t)
    if len(groups) == 1:
        return {SAFETENSORS_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": names for i, names in enumerate(groups)}

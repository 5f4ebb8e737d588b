"""Configurations of the NVLM model family: one dataclass per part, presets by name.

    config = NVLMConfig.from_preset("tiny")          # NVLM-D, CPU-trainable in minutes
    config = NVLMConfig.from_preset("72b", arch="D") # NVLM-D-72B sizes (docs/nvlm.md sections 3-7)
    config = NVLMConfig.from_preset("tiny", arch="X") # NVLM-X: 1-layer projector, X-attn blocks

Numbers come from docs/nvlm.md; a field's comment says where a preset's value comes from when it is not
obvious. Configs are plain data: `to_dict()` / `from_dict()` round-trip through JSON (training
checkpoints store them); reading a public checkpoint's config.json is nvlm.checkpoint's job.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InputError

Arch = Literal["D", "X", "H"]
ARCHS: tuple[str, ...] = ("D", "X", "H")

# Ids of the built-in byte-level tokenizer (nvlm.tokenizer.ByteTokenizer): 256 byte ids, then
# its special tokens. The tiny preset's vocabulary is that tokenizer's, padded to a multiple of 8.
BYTE_TOKENIZER_IMAGE_TOKEN_ID = 259
BYTE_TOKENIZER_VOCAB_SIZE = 264

# Regular tiles per image at most, wherever a tile count comes in (configs, checkpoints, flags).
# Published settings use 6 (NVLM) to 40 (InternVL's largest); 64 leaves room above them while
# one image's decoder span stays at 65 x 256 = 16,640 tokens (half the 72B model's context) and
# its 280 candidate grids enumerate in 0.1 ms. An unbounded count once made candidate enumeration
# allocate 24 GB.
MAX_TILES_LIMIT = 64


def check_max_tiles(value: Any, name: str = "max_tiles") -> int:
    """`value` if it is an int in [1, MAX_TILES_LIMIT]; else TypeError (not an int) or
    ValueError, naming `name` (a field or a flag) and the limit."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise InputError(f"{name}: expected a positive int, got {value}")
    if value > MAX_TILES_LIMIT:
        raise InputError(f"{name}: expected at most {MAX_TILES_LIMIT} (MAX_TILES_LIMIT; published "
                         f"NVLM/InternVL settings use 6 to 40), got {value}")
    return int(value)


# The tag of the thumbnail tile in the prompt (NVLM-D-72B, InternVL2; docs/nvlm.md section 6).
DEFAULT_THUMBNAIL_TAG = "<tile_global_thumbnail>"


@dataclass
class VisionConfig:
    """InternViT (docs/nvlm.md section 3). Tokens per tile before the shuffle: (image_size / patch_size)^2."""

    image_size: int = 448            # tile side S in pixels
    patch_size: int = 14
    hidden_size: int = 3200
    num_layers: int = 45
    num_heads: int = 25
    intermediate_size: int = 12800   # MLP width (GELU)
    norm_type: Literal["rms_norm", "layer_norm"] = "rms_norm"
    norm_eps: float = 1e-6
    qk_normalization: bool = True    # RMSNorm of q and k over the full width (6B flavour)
    qkv_bias: bool = False
    layerscale_init: float = 0.1     # initial value of the LayerScale vectors ls1 / ls2
    # All-zero heads that a checkpoint pads the attention with (NVLM-D-72B: 25 -> 32 heads for
    # 8-way tensor parallelism). The model never holds them: nvlm.checkpoint strips and re-adds them.
    num_dummy_heads: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of a tile."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        _require_positive("vision", self, "image_size", "patch_size", "hidden_size", "num_layers",
                          "num_heads", "intermediate_size")
        _require(self.image_size % self.patch_size == 0, "vision.image_size",
                 f"a multiple of patch_size {self.patch_size}", self.image_size)
        _require(self.hidden_size % self.num_heads == 0, "vision.hidden_size",
                 f"a multiple of num_heads {self.num_heads}", self.hidden_size)
        _require(self.norm_type in ("rms_norm", "layer_norm"), "vision.norm_type",
                 "'rms_norm' or 'layer_norm'", self.norm_type)
        _require(self.num_dummy_heads >= 0, "vision.num_dummy_heads", ">= 0", self.num_dummy_heads)


@dataclass
class LLMConfig:
    """A Qwen2-style decoder (docs/nvlm.md section 7); Yi-34B is the same shape without biases."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    num_layers: int = 80
    num_heads: int = 64
    num_kv_heads: int = 8
    intermediate_size: int = 29568   # SwiGLU width
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True      # q/k/v projections carry a bias (Qwen2); o_proj never does
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _require_positive("llm", self, "vocab_size", "hidden_size", "num_layers", "num_heads",
                          "num_kv_heads", "intermediate_size")
        _require(self.hidden_size % self.num_heads == 0, "llm.hidden_size",
                 f"a multiple of num_heads {self.num_heads}", self.hidden_size)
        _require(self.num_heads % self.num_kv_heads == 0, "llm.num_heads",
                 f"a multiple of num_kv_heads {self.num_kv_heads}", self.num_heads)
        _require(self.head_dim % 2 == 0, "llm.head_dim", "even (RoPE rotates pairs)", self.head_dim)


@dataclass
class ProjectorConfig:
    """Pixel shuffle + LayerNorm(4C) -> Linear [-> GELU -> Linear] (docs/nvlm.md sections 4-5).

    NVLM-D-72B: hidden = the LLM's MLP width, no biases; InternVL2-style: hidden = the LLM width,
    biases on both Linears. NVLM-X uses one Linear (num_layers = 1).
    """

    hidden_size: int = 29568
    bias: bool = False
    num_layers: Literal[1, 2] = 2
    downsample_scale: int = 2        # pixel-shuffle fold: tokens per tile / scale^2
    layernorm_eps: float = 1e-5      # the HF code's value (Megatron uses 1e-6)

    def validate(self) -> None:
        _require(self.num_layers in (1, 2), "projector.num_layers", "1 or 2", self.num_layers)
        _require(self.downsample_scale >= 1, "projector.downsample_scale", ">= 1",
                 self.downsample_scale)


@dataclass
class NVLMConfig:
    """The whole model: architecture, parts, image placeholder and tiling."""

    arch: Arch = "D"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int = 151654     # `<|vision_pad|>` in the Qwen2.5 vocabulary (NVLM-D-72B)
    max_tiles: int = 6               # regular tiles per image; a thumbnail comes on top
    use_thumbnail: bool = True
    thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG   # `<tile_global>` for the 34B (Yi) model
    # The 1-D tile tags before each tile's tokens (docs/nvlm.md section 6). False: none, the "no tag"
    # baseline of the paper's Table 1, NVLM-D only (X and H tie their tags to tiles).
    tile_tags: bool = True
    # Decoder layers preceded by a gated cross-attention block (NVLM-X/H; empty for NVLM-D).
    xattn_layers: tuple[int, ...] = ()

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per tile after the pixel shuffle (256 for 448-px tiles)."""
        return (self.vision.grid_size // self.projector.downsample_scale) ** 2

    def validate(self) -> "NVLMConfig":
        _require(self.arch in ARCHS, "arch", f"one of {ARCHS}", self.arch)
        self.vision.validate()
        self.llm.validate()
        self.projector.validate()
        _require(self.vision.grid_size % self.projector.downsample_scale == 0,
                 "projector.downsample_scale",
                 f"a divisor of the {self.vision.grid_size}-patch grid side",
                 self.projector.downsample_scale)
        check_max_tiles(self.max_tiles)
        _require(isinstance(self.tile_tags, bool), "tile_tags", "True or False", self.tile_tags)
        _require(self.tile_tags or self.arch == "D", "tile_tags",
                 f"True for arch {self.arch!r} (NVLM-X/H tie each tag to its tile)",
                 self.tile_tags)
        layers = tuple(self.xattn_layers)
        if self.arch == "D":
            _require(not layers, "xattn_layers", "empty for arch 'D'", layers)
        else:
            _require(bool(layers), "xattn_layers",
                     f"at least one decoder layer index for arch {self.arch!r} (its images reach "
                     "the decoder only through the X-attn blocks)", layers)
        _require(list(layers) == sorted(set(layers)), "xattn_layers",
                 "sorted and without repeats", layers)
        _require(all(0 <= i < self.llm.num_layers for i in layers), "xattn_layers",
                 f"indices in [0, {self.llm.num_layers})", layers)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NVLMConfig":
        data = dict(data)
        parts = {"vision": VisionConfig, "llm": LLMConfig, "projector": ProjectorConfig}
        for name, part_cls in parts.items():
            if name in data:
                data[name] = _dataclass_from_dict(part_cls, data[name], name)
        if "xattn_layers" in data:
            data["xattn_layers"] = tuple(data["xattn_layers"])
        return _dataclass_from_dict(cls, data, "config").validate()

    @classmethod
    def from_preset(cls, name: str, arch: Arch = "D") -> "NVLMConfig":
        """`tiny`, `1b`, `34b` or `72b` for arch D, X or H: the same ViT and LLM; X swaps the
        projector for one Linear and both add X-attn blocks every XATTN_EVERY[name] layers."""
        if name not in PRESETS:
            raise InputError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        if arch not in ARCHS:
            raise InputError(f"arch: expected one of {ARCHS}, got {arch!r}")
        config = PRESETS[name]()
        if arch != "D":
            every = XATTN_EVERY[name]
            config.arch = arch
            config.xattn_layers = tuple(range(0, config.llm.num_layers, every))
            if arch == "X":  # docs/nvlm.md section 1: LayerNorm(4C) -> Linear(4C -> D)
                config.projector = dataclasses.replace(config.projector, num_layers=1)
        return config.validate()


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise InputError(f"{name}: expected {expected}, got {got!r}")


def _require_positive(section: str, config: Any, *names: str) -> None:
    """Sizes checked before anything divides by them (a 0 would be a ZeroDivisionError)."""
    for name in names:
        _require(getattr(config, name) >= 1, f"{section}.{name}", ">= 1", getattr(config, name))


def _dataclass_from_dict(cls, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
    return cls(**data)


def _internvit_6b() -> VisionConfig:
    return VisionConfig()


def _internvit_300m() -> VisionConfig:
    return VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                        norm_type="layer_norm", qk_normalization=False, qkv_bias=True,
                        layerscale_init=1.0)


def _tiny() -> NVLMConfig:
    # Sized for the CPU demo: 112-px tiles (8x8 patches -> 16 tokens per tile), a byte-level
    # vocabulary, 32-wide heads.
    vision = VisionConfig(image_size=112, hidden_size=128, num_layers=3, num_heads=4,
                          intermediate_size=512, norm_type="layer_norm", qk_normalization=False,
                          qkv_bias=True, layerscale_init=1.0)
    llm = LLMConfig(vocab_size=BYTE_TOKENIZER_VOCAB_SIZE, hidden_size=192, num_layers=3,
                    num_heads=6, num_kv_heads=2, intermediate_size=512, rope_theta=1e4,
                    tie_word_embeddings=True, max_position_embeddings=4096)
    projector = ProjectorConfig(hidden_size=192, bias=True)
    return NVLMConfig(vision=vision, llm=llm, projector=projector,
                      image_token_id=BYTE_TOKENIZER_IMAGE_TOKEN_ID)


def _1b() -> NVLMConfig:
    # InternViT-300M + Qwen2-0.5B with an InternVL2-style projector (hidden = LLM width, biases).
    llm = LLMConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                    num_kv_heads=2, intermediate_size=4864, tie_word_embeddings=True)
    return NVLMConfig(vision=_internvit_300m(), llm=llm,
                      projector=ProjectorConfig(hidden_size=896, bias=True))


def _34b() -> NVLMConfig:
    # Nous-Hermes-2-Yi-34B (RMSNorm eps 1e-5 as in Yi's config). NVLM-34B is not public, so the
    # placeholder id is our choice: the last row of Yi's 64000-token vocabulary.
    llm = LLMConfig(vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56,
                    num_kv_heads=8, intermediate_size=20480, rope_theta=5e6, rms_norm_eps=1e-5,
                    attention_bias=False, max_position_embeddings=4096)
    return NVLMConfig(vision=_internvit_6b(), llm=llm,
                      projector=ProjectorConfig(hidden_size=20480, bias=False),
                      image_token_id=63999, thumbnail_tag="<tile_global>")


def _72b() -> NVLMConfig:
    # NVLM-D-72B as released: the checkpoint pads InternViT's 25 heads to 32.
    vision = dataclasses.replace(_internvit_6b(), num_dummy_heads=7)
    return NVLMConfig(vision=vision, llm=LLMConfig(),
                      projector=ProjectorConfig(hidden_size=29568, bias=False))


PRESETS = {"tiny": _tiny, "1b": _1b, "34b": _34b, "72b": _72b}

# NVLM-X/H: an X-attn block before decoder layers 0, k, 2k, ... (docs/nvlm.md section 8): k = 8 at 72B
# and 6 at 34B give the paper's 10 blocks. [our choice] k = 4 for the 24-layer 1b (6 blocks) and
# 2 for the 3-layer tiny (blocks before layers 0 and 2).
XATTN_EVERY = {"tiny": 2, "1b": 4, "34b": 6, "72b": 8}

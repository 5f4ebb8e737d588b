"""nvlm_kernels: fused kernels for NVLM-style vision-language models.

Ops (shapes in each docstring; meaning in nvlm_kernels.reference):
    pixel_shuffle, pixel_shuffle_layernorm, multimodal_embed, varlen_attention, cross_attention
Helper: cross_attention_ranges builds cross_attention's per-query key ranges for NVLM-X/H.
Backends: use_backend("torch" | "triton" | "native" | "auto"), env NVLM_KERNELS_BACKEND;
available_backends() says which are usable here and why the others are not.
Tuning: the attention kernels launch one shipped configuration per key; inside autotuning() (or
with NVLM_KERNELS_AUTOTUNE=1) they time their few candidates once per key and keep the fastest;
tuned_configs() says what was picked.

Importing this package touches neither CUDA, triton nor the compiled extension; they are loaded
on first use.
"""

from ._backends import BackendStatus, available_backends, use_backend
from ._tuning import autotuning, tuned_configs
from .ranges import cross_attention_ranges
from .functional import (
    cross_attention,
    multimodal_embed,
    pixel_shuffle,
    pixel_shuffle_layernorm,
    varlen_attention,
)

__all__ = [
    "BackendStatus",
    "autotuning",
    "available_backends",
    "cross_attention",
    "cross_attention_ranges",
    "multimodal_embed",
    "pixel_shuffle",
    "pixel_shuffle_layernorm",
    "tuned_configs",
    "use_backend",
    "varlen_attention",
]

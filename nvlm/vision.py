"""InternViT, the vision encoder of NVLM (docs/nvlm.md section 3), over all tiles of a batch packed.

Module and parameter names follow the InternVL / NVLM-D checkpoints (`embeddings.patch_embedding`,
`encoder.layers.{i}.attn.qkv`, `ls1`, ...), so their state dicts load without renaming.

Shape legend: N tiles, P patches per tile (+1 with the CLS token), C width, H heads, d head dim,
T = N * (P + 1) packed tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import nvlm_kernels

from .config import VisionConfig
from .errors import InputError
from .layers import RMSNorm, init_linear


def _norm(config: VisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + config.grid_size ** 2, c))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        nn.init.zeros_(self.patch_embedding.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches_NCgg = self.patch_embedding(pixel_values.to(weight.dtype))
        patches_NPC = patches_NCgg.flatten(2).transpose(1, 2)       # patch index = row * g + col
        cls_N1C = self.class_embedding.expand(patches_NPC.shape[0], -1, -1).to(patches_NPC.dtype)
        return torch.cat([cls_N1C, patches_NPC], dim=1) + self.position_embedding.to(patches_NPC.dtype)


class InternAttention(nn.Module):
    """Full (non-causal) self-attention within each tile, all tiles in one varlen_attention call."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=config.qkv_bias)
        self.proj = nn.Linear(c, c)
        # InternViT-6B normalises q and k over the full width (all heads at once), not per head.
        self.q_norm = RMSNorm(c, eps=config.norm_eps) if config.qk_normalization else None
        self.k_norm = RMSNorm(c, eps=config.norm_eps) if config.qk_normalization else None

    def forward(self, x_TC: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        q_TC, k_TC, v_TC = self.qkv(x_TC).chunk(3, dim=-1)
        if self.q_norm is not None:
            q_TC, k_TC = self.q_norm(q_TC), self.k_norm(k_TC)
        heads = (x_TC.shape[0], self.num_heads, self.head_dim)
        out_THd = nvlm_kernels.varlen_attention(
            q_TC.reshape(heads), k_TC.reshape(heads), v_TC.reshape(heads),
            cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
        return self.proj(out_THd.reshape(x_TC.shape[0], self.num_heads * self.head_dim))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm residual block with LayerScale: x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layerscale_init = config.layerscale_init
        self.norm1 = _norm(config, config.hidden_size)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(torch.empty(config.hidden_size))
        self.norm2 = _norm(config, config.hidden_size)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(torch.empty(config.hidden_size))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.ls1, self.layerscale_init)
        nn.init.constant_(self.ls2, self.layerscale_init)

    def forward(self, x_TC: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x_TC = x_TC + self.ls1 * self.attn(self.norm1(x_TC), cu_seqlens, max_seqlen)
        return x_TC + self.ls2 * self.mlp(self.norm2(x_TC))


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config)
                                    for _ in range(config.num_layers))


class InternVisionModel(nn.Module):
    """pixel_values (N, 3, S, S) -> the last layer's patch tokens (N, P, C), CLS dropped."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)
            elif isinstance(module, (nn.LayerNorm, RMSNorm, InternVisionEmbeddings,
                                     InternVisionEncoderLayer)):
                module.reset_parameters()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise InputError(f"pixel_values: expected shape (num_tiles, 3, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        x_NLC = self.embeddings(pixel_values)
        n, length, c = x_NLC.shape
        # Every tile is one sequence of the packed batch: attention never crosses tiles.
        cu_seqlens = torch.arange(0, (n + 1) * length, length, dtype=torch.int32,
                                  device=x_NLC.device)
        x_TC = x_NLC.reshape(n * length, c)
        for layer in self.encoder.layers:
            x_TC = layer(x_TC, cu_seqlens, length)
        return x_TC.view(n, length, c)[:, 1:]

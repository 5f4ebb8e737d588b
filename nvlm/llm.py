"""The Qwen2-style decoder of NVLM (docs/nvlm.md section 7) over packed sequences, with a static KV cache.

Names follow Hugging Face's Qwen2ForCausalLM (`model.layers.{i}.self_attn.q_proj`, `lm_head`), so the
`language_model.*` tensors of NVLM-D / InternVL checkpoints load without renaming.

Two attention paths:
- training and one-shot forward: causal `varlen_attention` over the packed samples;
- with a KVCache: the new keys/values are written into the cache at (sample, position), and each
  query attends to its sample's cache rows [0, position] through `cross_attention` with per-query
  key ranges. That one path serves prefill, continued prefill and one-token decode, and never
  copies or compacts the cache.

Only some positions of the last layer are ever read (the loss targets in training, each prompt's
last token in a prefill), so the decoder takes `output_rows`: the last layer still computes keys
and values at every position, but its queries, attention output and MLP only at those rows, which
attend through `cross_attention` with their causal key ranges. In the tiny demo's SFT (about 20
targets in a 1,000-token row, 3 layers) that skips nearly a third of the decoder's work.

Shape legend: T packed tokens, D width, H query heads, K key/value heads, d head dim,
B samples (sequences) in the pack, M cache slots per sample.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import nvlm_kernels

from .config import LLMConfig
from .layers import RMSNorm, init_linear
from .packing import PackedLayout


class KVCache:
    """Static per-layer key/value buffers (num_layers, B, M, K, d), allocated once per generation.

    Sample b's token at position p lives in slot [b, p]; slots are written in place, so the decode
    loop allocates nothing and needs no host synchronisation.
    """

    def __init__(self, config: LLMConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len

    def key_ranges(self, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_start, kv_end) int32 over the flattened (B * M) cache: each token sees its own
        sample's slots up to and including its position (causal)."""
        start = layout.batch_index * self.max_len
        return start.int(), (start + layout.position_ids + 1).int()

    def write(self, layer: int, k_TKd: torch.Tensor, v_TKd: torch.Tensor,
              layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; returns the layer's cache flattened to (B * M, K, d)."""
        slots = (layout.batch_index, layout.position_ids)
        self.keys[layer].index_put_(slots, k_TKd.to(self.keys.dtype))
        self.values[layer].index_put_(slots, v_TKd.to(self.values.dtype))
        return self.keys[layer].flatten(0, 1), self.values[layer].flatten(0, 1)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int,
                   theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin (T, d) of the angles position * theta^(-2i/d), halves concatenated."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    angles_T = position_ids.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles_T, angles_T], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x_THd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of every head (Qwen2's rotate_half layout)."""
    half = x_THd.shape[-1] // 2
    rotated = torch.cat([-x_THd[..., half:], x_THd[..., :half]], dim=-1)
    # In x's dtype, as Qwen2 does: bf16 activations stay bf16 for the attention kernel.
    cos, sin = cos.to(x_THd.dtype)[:, None, :], sin.to(x_THd.dtype)[:, None, :]
    return x_THd * cos + rotated * sin


class Qwen2Attention(nn.Module):
    def __init__(self, config: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        d_model, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d_model, config.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d_model, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(d_model, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, d_model, bias=False)

    def forward(self, h_TD: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                layout: PackedLayout, cache: KVCache | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output (T, D), or (R, D) for queries at the packed positions `rows` only
        (keys and values still come from every position)."""
        total = h_TD.shape[0]
        k_TKd = self.k_proj(h_TD).view(total, self.num_kv_heads, self.head_dim)
        v_TKd = self.v_proj(h_TD).view(total, self.num_kv_heads, self.head_dim)
        k_TKd = apply_rotary(k_TKd, *rotary)
        if rows is not None:
            h_TD, rotary = h_TD[rows], (rotary[0][rows], rotary[1][rows])   # T -> R from here
        q_THd = self.q_proj(h_TD).view(h_TD.shape[0], self.num_heads, self.head_dim)
        q_THd = apply_rotary(q_THd, *rotary)
        if cache is None and rows is None:
            out_THd = nvlm_kernels.varlen_attention(
                q_THd, k_TKd, v_TKd, layout.cu_seqlens, layout.cu_seqlens,
                layout.max_seqlen, layout.max_seqlen, causal=True)
        else:
            if cache is None:
                keys, values = k_TKd, v_TKd
                kv_start, kv_end = layout.causal_key_ranges(rows)
            else:
                keys, values = cache.write(self.layer_index, k_TKd, v_TKd, layout)
                kv_start, kv_end = cache.key_ranges(layout)
                if rows is not None:
                    kv_start, kv_end = kv_start[rows], kv_end[rows]
            out_THd = nvlm_kernels.cross_attention(q_THd, keys.to(q_THd.dtype),
                                                   values.to(q_THd.dtype), kv_start, kv_end)
        return self.o_proj(out_THd.reshape(h_TD.shape[0], self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, h_TD: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                layout: PackedLayout, cache: KVCache | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(T, D) -> (T, D), or (R, D) at the packed positions `rows` only."""
        attended = self.self_attn(self.input_layernorm(h_TD), rotary, layout, cache, rows)
        h_TD = (h_TD if rows is None else h_TD[rows]) + attended
        return h_TD + self.mlp(self.post_attention_layernorm(h_TD))


class Qwen2Model(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """Embeddings are looked up by the caller (NVLM writes image rows into them); this module runs
    the layers on packed embeddings and maps hidden states to logits with `logits()`."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

    def forward(self, h_TD: torch.Tensor, layout: PackedLayout, cache: KVCache | None = None,
                before_layer: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder layers on packed embeddings h (T, D); returns hidden states (T, D),
        or (R, D) at the packed positions `output_rows` (R,) int64 alone, which the last layer
        then computes apart from its keys and values (module docstring).

        before_layer maps a layer index to a function applied to the hidden states just before
        that layer (NVLM-X/H put their X-attn blocks there)."""
        rotary = self.rotary(layout.position_ids)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            if before_layer is not None and i in before_layer:
                h_TD = before_layer[i](h_TD)
            h_TD = layer(h_TD, rotary, layout, cache, output_rows if i == last else None)
        return h_TD

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        """Final norm, then the output projection (the embedding table when tied)."""
        return F.linear(self.model.norm(h_TD), self.output_weight)

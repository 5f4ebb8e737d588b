"""The gated cross-attention (X-attn) block of NVLM-X and NVLM-H (docs/nvlm.md section 8).

    h = h + tanh(attn_gate) * XAttn(RMSNorm(h), memory)
    h = h + tanh(ffn_gate)  * FFN(RMSNorm(h))

Queries come from the packed text, keys and values from the packed image memory (already at the
LLM width), with the LLM's head layout and GQA; each text token sees one contiguous range of the
memory (`nvlm_kernels.cross_attention_ranges` builds them). Both gates are scalars initialised at
0, so a fresh block is the identity and a fresh NVLM-X/H equals its LLM. The attention gate is
applied by `cross_attention` itself (in the kernel's epilogue); o_proj has no bias, so gating
before or after it is the same.

[our choice] No positional encoding in the cross-attention (the tile tags carry the order), no
biases on the projections, no normalisation of the memory (the projector ends with a Linear and
the k/v projections learn the scale).

Shape legend: T text tokens, M memory rows, D width, H query heads, K key/value heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

import nvlm_kernels

from .config import LLMConfig
from .layers import RMSNorm, init_linear, nvtx_range
from .llm import Qwen2MLP


class XAttnBlock(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        d_model, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
        self.input_layernorm = RMSNorm(d_model, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d_model, config.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_width, bias=False)
        self.v_proj = nn.Linear(d_model, kv_width, bias=False)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, d_model, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(d_model, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ffn_gate)

    def memory_kv(self, memory_MD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values (M, K, d): computed once per batch (or per prompt in
        generation) and reused by every text token."""
        rows = memory_MD.shape[0]
        k_MKd = self.k_proj(memory_MD).view(rows, self.num_kv_heads, self.head_dim)
        v_MKd = self.v_proj(memory_MD).view(rows, self.num_kv_heads, self.head_dim)
        return k_MKd, v_MKd

    def forward(self, h_TD: torch.Tensor,
                memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                kv_start: torch.Tensor, kv_end: torch.Tensor) -> torch.Tensor:
        """memory: the rows (M, D), projected here (training: inside forward, so FSDP gathers
        the weights once), or their (keys, values) from `memory_kv` (generation's cache)."""
        with nvtx_range("xattn"):
            total = h_TD.shape[0]
            q_THd = self.q_proj(self.input_layernorm(h_TD)).view(total, self.num_heads, self.head_dim)
            k_MKd, v_MKd = self.memory_kv(memory) if isinstance(memory, torch.Tensor) else memory
            gate = self.attn_gate.to(q_THd.dtype)
            out_THd = nvlm_kernels.cross_attention(q_THd, k_MKd.to(q_THd.dtype),
                                                   v_MKd.to(q_THd.dtype), kv_start, kv_end,
                                                   gate=gate)
            h_TD = h_TD + self.o_proj(out_THd.reshape(total, self.num_heads * self.head_dim))
            ffn = self.mlp(self.post_attention_layernorm(h_TD))
            return h_TD + torch.tanh(self.ffn_gate).to(ffn.dtype) * ffn

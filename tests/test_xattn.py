"""The X-attn block (NVLM-X/H): identity when fresh, a dense masked reference otherwise, gradients
to both gates, and text outside every range untouched by the memory."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from nvlm.config import LLMConfig
from nvlm.xattn import XAttnBlock

CONFIG = LLMConfig(vocab_size=50, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=2,
                   intermediate_size=40)


def block_and_inputs(seed=0):
    torch.manual_seed(seed)
    block = XAttnBlock(CONFIG)
    block.init_weights()
    h = torch.randn(13, 48)
    memory = torch.randn(20, 48)
    # samples: tokens 0-6 (image 0 = memory 0..11 appears at token 2), tokens 7-12 (image 1 =
    # memory 12..19 at token 9); tokens 3-4 are the tag of tile 1 (memory 4..8)
    sample = torch.tensor([0] * 7 + [1] * 6)
    image = torch.tensor([-1, -1, 0, 0, 0, 0, -1, -1, -1, 1, 1, -1, -1])
    tile = torch.tensor([-1, -1, -1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1])
    kv_start, kv_end = nk.cross_attention_ranges(sample, image, torch.tensor([0, 12, 20]), tile,
                                                 torch.tensor([0, 4, 8, 12, 20]))
    return block, h, memory, kv_start, kv_end


def reference(block, h, memory, kv_start, kv_end):
    """The block written with a dense boolean mask and plain tensor ops."""
    def rms(x, w):
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + CONFIG.rms_norm_eps) * w

    d = CONFIG.head_dim
    q = (rms(h, block.input_layernorm.weight) @ block.q_proj.weight.T).view(-1, 6, d)
    k = (memory @ block.k_proj.weight.T).view(-1, 2, d).repeat_interleave(3, 1)
    v = (memory @ block.v_proj.weight.T).view(-1, 2, d).repeat_interleave(3, 1)
    keys = torch.arange(memory.shape[0])
    visible = (keys[None] >= kv_start[:, None]) & (keys[None] < kv_end[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(h.shape[0], -1)
    h = h + torch.tanh(block.attn_gate) * (attn @ block.o_proj.weight.T)
    m = block.mlp
    y = rms(h, block.post_attention_layernorm.weight)
    ffn = (F.silu(y @ m.gate_proj.weight.T) * (y @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return h + torch.tanh(block.ffn_gate) * ffn


def test_fresh_block_is_the_identity():
    block, h, memory, kv_start, kv_end = block_and_inputs()
    assert torch.equal(block(h, memory, kv_start, kv_end), h)


def test_block_matches_dense_reference_and_gates_get_gradients():
    block, h, memory, kv_start, kv_end = block_and_inputs(1)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ffn_gate.fill_(-0.4)
    out = block(h, memory, kv_start, kv_end)
    torch.testing.assert_close(out, reference(block, h, memory, kv_start, kv_end),
                               rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_memory_reaches_only_the_tokens_whose_range_covers_it():
    block, h, memory, kv_start, kv_end = block_and_inputs(2)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    before = block(h, memory, kv_start, kv_end)
    changed = memory.clone()
    changed[4:8] += 1.0          # tile 1 of image 0
    after = block(h, changed, kv_start, kv_end)
    moved = (after - before).abs().amax(-1) > 1e-6
    sees_tile = (kv_start < 8) & (kv_end > 4)
    assert torch.equal(moved, sees_tile)
    assert not moved[:2].any() and moved[3:5].all()     # text before the image; the tile's tag

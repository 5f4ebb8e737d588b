"""reference.py against independent formulas: explicit loops, F.scaled_dot_product_attention,
dense masked softmax, and a second derivation of the NVLM pixel-shuffle layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nvlm_kernels import reference

f64 = torch.float64


# --------------------------------------------------------------------------------------------
# pixel shuffle


def explicit_pixel_shuffle(x: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """Token by token: output (r, c) = concat of patches (s*r + i, s*c + j), i-major."""
    n, _, c = x.shape
    rows = []
    for b in range(n):
        for r in range(h // s):
            for col in range(w // s):
                parts = [x[b, (s * r + i) * w + s * col + j] for i in range(s) for j in range(s)]
                rows.append(torch.cat(parts))
    return torch.stack(rows).reshape(n, (h // s) * (w // s), s * s * c)


@pytest.mark.parametrize("n,h,w,c,s", [(1, 6, 6, 5, 2), (3, 4, 8, 3, 2), (2, 6, 9, 4, 3),
                                       (1, 32, 32, 7, 2), (2, 5, 5, 2, 1)])
def test_pixel_shuffle_matches_explicit_layout(n, h, w, c, s):
    x = torch.randn(n, h * w, c, dtype=f64)
    grid = None if h == w else (h, w)
    torch.testing.assert_close(reference.pixel_shuffle(x, s, grid), explicit_pixel_shuffle(x, h, w, s),
                               rtol=0, atol=0)


def test_pixel_shuffle_is_nvlm_v2_layout():
    """docs/nvlm.md section 4 spelled out on a 4x4 grid whose channel value is its token index:
    output token (r, c) = [(2r,2c) | (2r,2c+1) | (2r+1,2c) | (2r+1,2c+1)]."""
    x = torch.arange(16, dtype=f64).reshape(1, 16, 1)
    out = reference.pixel_shuffle(x, 2)[0]
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=f64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_pixel_shuffle_equals_internvl_v2_derivation():
    """InternVL's two-step fold (merge columns, transpose, merge rows) plus the v2 transpose."""
    n, side, c = 2, 8, 3
    x = torch.randn(n, side * side, c, dtype=f64)
    grid = x.reshape(n, side, side, c)                           # (n, row, col, C)
    merged_cols = grid.reshape(n, side, side // 2, 2 * c)          # (n, row, col/2, 2C)
    merged_rows = merged_cols.permute(0, 2, 1, 3).reshape(n, side // 2, side // 2, 4 * c)
    v2 = merged_rows.permute(0, 2, 1, 3).reshape(n, side * side // 4, 4 * c)
    torch.testing.assert_close(reference.pixel_shuffle(x, 2), v2, rtol=0, atol=0)


def test_pixel_shuffle_layernorm_matches_explicit_statistics():
    x = torch.randn(2, 36, 7, dtype=f64) * 3 + 1
    weight, bias = torch.randn(28, dtype=f64), torch.randn(28, dtype=f64)
    y = explicit_pixel_shuffle(x, 6, 6, 2)
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    expected = (y - mean) / torch.sqrt(var + 1e-6) * weight + bias
    torch.testing.assert_close(reference.pixel_shuffle_layernorm(x, weight, bias, 1e-6, 2), expected)


# --------------------------------------------------------------------------------------------
# multimodal embedding


def test_multimodal_embed_matches_running_count_loop():
    vocab, dim, image_id = 30, 6, 77
    ids = torch.randint(0, vocab, (3, 11))
    ids[0, 2:5] = image_id
    ids[2, 0] = image_id
    ids[2, -1] = image_id
    table = torch.randn(vocab, dim, dtype=f64)
    images = torch.randn(int((ids == image_id).sum()), dim, dtype=f64)
    expected = torch.empty(3, 11, dim, dtype=f64)
    next_image = 0
    for b in range(3):
        for t in range(11):
            if ids[b, t] == image_id:
                expected[b, t] = images[next_image]
                next_image += 1
            else:
                expected[b, t] = table[ids[b, t]]
    torch.testing.assert_close(reference.multimodal_embed(ids, table, images, image_id), expected,
                               rtol=0, atol=0)


def test_multimodal_embed_accepts_any_id_shape():
    table, images = torch.randn(5, 3, dtype=f64), torch.randn(1, 3, dtype=f64)
    torch.testing.assert_close(reference.multimodal_embed(torch.tensor(9), table, images, 9), images[0])
    torch.testing.assert_close(reference.multimodal_embed(torch.tensor(2), table, images[:0], 9), table[2])
    empty = torch.zeros(2, 0, 3, dtype=torch.long)
    assert reference.multimodal_embed(empty, table, images[:0], 9).shape == (2, 0, 3, 3)


def test_multimodal_embed_gradients_go_to_their_sources():
    table = torch.randn(5, 3, dtype=f64, requires_grad=True)
    images = torch.randn(2, 3, dtype=f64, requires_grad=True)
    ids = torch.tensor([1, 9, 1, 9, 4], dtype=torch.int32)
    out = reference.multimodal_embed(ids, table, images, 9)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_table = torch.zeros(5, 3, dtype=f64)
    expected_table[1] = grad[0] + grad[2]
    expected_table[4] = grad[4]
    torch.testing.assert_close(table.grad, expected_table)  # nothing flows to row 0 from images
    torch.testing.assert_close(images.grad, grad[[1, 3]])


# --------------------------------------------------------------------------------------------
# varlen attention


def sdpa_per_sequence(q, k, v, lengths_q, lengths_k, causal, scale):
    """F.scaled_dot_product_attention one sequence at a time; rows that see no key are 0."""
    groups = q.shape[1] // k.shape[1]
    outputs, q0, k0 = [], 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        qs = q[q0:q0 + lq].transpose(0, 1)
        ks = k[k0:k0 + lk].repeat_interleave(groups, 1).transpose(0, 1)
        vs = v[k0:k0 + lk].repeat_interleave(groups, 1).transpose(0, 1)
        out = torch.zeros(lq, q.shape[1], q.shape[2], dtype=q.dtype)
        first_row = max(0, lq - lk) if causal else (0 if lk else lq)
        if first_row < lq:
            rows = torch.arange(first_row, lq)[:, None]
            mask = torch.arange(lk)[None, :] <= rows + (lk - lq) if causal else None
            part = F.scaled_dot_product_attention(qs[:, first_row:], ks, vs, attn_mask=mask, scale=scale)
            out = torch.cat([out[:first_row], part.transpose(0, 1)])
        outputs.append(out)
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outputs)


def cu_seqlens(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths_q,lengths_k,hq,hk,d", [
    ([1, 7, 64, 129, 0], [1, 7, 64, 129, 0], 4, 4, 16),     # self-attention pack incl. empty
    ([3, 5, 0, 9], [8, 5, 4, 2], 14, 2, 8),                  # lq < lk, lq > lk (rows w/o keys), GQA 7
    ([2, 11], [30, 11], 8, 1, 12),                            # GQA 8
])
def test_varlen_attention_matches_sdpa_loop(lengths_q, lengths_k, hq, hk, d, causal):
    q = torch.randn(sum(lengths_q), hq, d, dtype=f64)
    k = torch.randn(sum(lengths_k), hk, d, dtype=f64)
    v = torch.randn(sum(lengths_k), hk, d, dtype=f64)
    scale = 0.37
    out = reference.varlen_attention(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k),
                                     max(lengths_q), max(lengths_k), scale, causal)
    expected = sdpa_per_sequence(q, k, v, lengths_q, lengths_k, causal, scale)
    torch.testing.assert_close(out, expected)


def test_varlen_attention_bottom_right_rows_without_keys_are_zero():
    q = torch.randn(5, 2, 4, dtype=f64)
    k, v = torch.randn(2, 2, 4, dtype=f64), torch.randn(2, 2, 4, dtype=f64)
    out = reference.varlen_attention(q, k, v, cu_seqlens([5]), cu_seqlens([2]), 5, 2, causal=True)
    assert torch.equal(out[:3], torch.zeros(3, 2, 4, dtype=f64))
    # the last query sees both keys: plain softmax attention
    probs = torch.softmax(torch.einsum("hd,khd->hk", q[4], k) / 2.0, dim=-1)
    torch.testing.assert_close(out[4], torch.einsum("hk,khd->hd", probs, v))


def test_varlen_attention_gradients_are_finite_and_exact():
    lengths_q, lengths_k = [3, 0, 2], [1, 2, 4]
    inputs = (torch.randn(5, 2, 3, dtype=f64, requires_grad=True),
              torch.randn(7, 1, 3, dtype=f64, requires_grad=True),
              torch.randn(7, 1, 3, dtype=f64, requires_grad=True))
    fn = lambda q, k, v: reference.varlen_attention(  # noqa: E731
        q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), 3, 4, None, True)
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# cross attention


def dense_cross_attention(q, k, v, start, end, scale, gate):
    groups = q.shape[1] // k.shape[1]
    keys = torch.arange(k.shape[0])
    visible = (keys[None, :] >= start[:, None].long()) & (keys[None, :] < end[:, None].long())
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(groups, 1)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # empty rows: all -inf -> NaN -> 0
    out = torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(groups, 1))
    if gate is not None:
        out = out * torch.tanh(torch.as_tensor(gate, dtype=out.dtype)).reshape(1, -1, 1)
    return out


@pytest.mark.parametrize("gate", [None, 0.7, "scalar", "per_head"])
def test_cross_attention_matches_dense_masked_softmax(gate):
    total_q, total_kv, hq, hk, d = 600, 90, 6, 3, 8   # 600 rows: several reference row blocks
    q = torch.randn(total_q, hq, d, dtype=f64)
    k, v = torch.randn(total_kv, hk, d, dtype=f64), torch.randn(total_kv, hk, d, dtype=f64)
    start = torch.randint(0, total_kv, (total_q,))
    end = torch.minimum(start + torch.randint(0, 40, (total_q,)), torch.tensor(total_kv))
    start[:10], end[:10] = 5, 5            # empty
    start[10:20], end[10:20] = 0, total_kv  # full memory
    start[20:30], end[20:30] = 7, 8         # a single key
    start[256:512], end[256:512] = 0, 0     # a whole block of empty rows
    gate_value = {"scalar": torch.tensor(0.4, dtype=f64),
                  "per_head": torch.randn(hq, dtype=f64)}.get(gate, gate)
    start, end = start.int(), end.int()
    out = reference.cross_attention(q, k, v, start, end, 0.3, gate_value)
    torch.testing.assert_close(out, dense_cross_attention(q, k, v, start, end, 0.3, gate_value))
    assert torch.equal(out[:10], torch.zeros(10, hq, d, dtype=f64))


def test_cross_attention_gradients_including_gate():
    q = torch.randn(6, 2, 3, dtype=f64, requires_grad=True)
    k = torch.randn(5, 1, 3, dtype=f64, requires_grad=True)
    v = torch.randn(5, 1, 3, dtype=f64, requires_grad=True)
    gate = torch.randn(2, dtype=f64, requires_grad=True)
    start = torch.tensor([0, 2, 3, 3, 0, 4], dtype=torch.int32)
    end = torch.tensor([5, 4, 3, 4, 1, 5], dtype=torch.int32)
    fn = lambda q, k, v, gate: reference.cross_attention(q, k, v, start, end, None, gate)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, gate))


def test_default_softmax_scale_is_inverse_sqrt_head_dim():
    q, k, v = (torch.randn(3, 1, 9, dtype=f64) for _ in range(3))
    cu = cu_seqlens([3])
    torch.testing.assert_close(reference.varlen_attention(q, k, v, cu, cu, 3, 3),
                               reference.varlen_attention(q, k, v, cu, cu, 3, 3, 1 / math.sqrt(9)))

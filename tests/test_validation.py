"""Every bad input of the public ops gets a ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _validate


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def attention_inputs(total_q=6, total_k=6, hq=4, hk=2, d=8, dtype=torch.float32):
    return (torch.randn(total_q, hq, d, dtype=dtype), torch.randn(total_k, hk, d, dtype=dtype),
            torch.randn(total_k, hk, d, dtype=dtype))


def varlen(q, k, v, cu_q=None, cu_k=None, max_q=6, max_k=6, **kwargs):
    cu_q = cu(0, 2, q.shape[0]) if cu_q is None else cu_q
    cu_k = cu(0, 3, k.shape[0]) if cu_k is None else cu_k
    return nk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


# --------------------------------------------------------------------------------------------
# varlen_attention


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_cu_seqlens_must_be_int32(dtype):
    q, k, v = attention_inputs()
    with pytest.raises(TypeError, match=r"cu_seqlens_q must be int32.*got torch\."):
        varlen(q, k, v, cu_q=torch.tensor([0, 2, 6], dtype=dtype))


def test_cu_seqlens_must_be_non_decreasing():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be non-decreasing.*cu_seqlens_k\[2\] = 1"):
        varlen(q, k, v, cu_k=cu(0, 4, 1, 6), cu_q=cu(0, 2, 4, 6))


def test_cu_seqlens_must_end_at_total():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_q must end at total_q = 6, got 5"):
        varlen(q, k, v, cu_q=cu(0, 2, 5))


def test_cu_seqlens_must_start_at_zero():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        varlen(q, k, v, cu_q=cu(1, 2, 6))


def test_cu_seqlens_lengths_must_agree():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match="same number of sequences"):
        varlen(q, k, v, cu_q=cu(0, 2, 4, 6))


def test_max_seqlen_must_cover_longest_sequence():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match=r"max_seqlen_q = 3 is smaller than the longest sequence.*\(4\)"):
        varlen(q, k, v, max_q=3)


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a shape check, free on any device
def test_max_seqlen_beyond_the_tokens(which, device):
    # it sizes the Triton grid: 7 tokens with max_seqlen 64,000 took 10 s under the interpreter
    q, k, v = (t.to(device) for t in attention_inputs(total_q=7, total_k=5))
    sizes = {"max_q": 7, "max_k": 5, f"max_{which}": 2**62}
    total = {"q": 7, "k": 5}[which]
    with pytest.raises(ValueError, match=rf"max_seqlen_{which} = {2**62} exceeds total_{which} = "
                                         rf"{total}.*longest sequence in cu_seqlens_{which}, at "
                                         rf"most {total}"):
        varlen(q, k, v, cu(0, 2, 7).to(device), cu(0, 3, 5).to(device), **sizes)


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (6.0, TypeError), (True, TypeError),
                                       (torch.tensor(6), TypeError)])
def test_max_seqlen_must_be_a_non_negative_int(bad, error):
    q, k, v = attention_inputs()
    with pytest.raises(error, match="max_seqlen_k must be"):
        varlen(q, k, v, max_k=bad)


def test_empty_pack_takes_any_max_seqlen():
    # the ViT of a batch without images runs its layers on 0 tiles with max_seqlen = tile length
    q, k, v = attention_inputs(total_q=0, total_k=0)
    assert varlen(q, k, v, cu(0), cu(0), max_q=1025, max_k=1025).shape == (0, 4, 8)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_attention_rank(which):
    inputs = dict(zip("qkv", attention_inputs()))
    inputs[which] = inputs[which].reshape(inputs[which].shape[0], -1)
    with pytest.raises(ValueError, match=rf"{which} must be a 3-D tensor \(total, nheads, headdim\)"):
        varlen(inputs["q"], inputs["k"], inputs["v"])


def test_attention_head_dim_mismatch():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match=r"k head dim must equal q's \(8\)"):
        varlen(q, k[..., :6], v)


def test_attention_dtype_mismatch():
    q, k, v = attention_inputs()
    with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\), got torch.float16"):
        varlen(q, k, v.half())


def test_attention_integer_inputs():
    q, k, v = attention_inputs()
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        varlen(q.long(), k, v)


def test_query_heads_must_be_multiple_of_key_heads():
    q, k, v = attention_inputs(hq=5, hk=2)
    with pytest.raises(ValueError, match="5 query heads of q must be a multiple of the 2 key/value heads"):
        varlen(q, k, v)


def test_head_dim_limit():
    q, k, v = attention_inputs(d=264)
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 256\], got 264"):
        varlen(q, k, v)


def test_softmax_scale_must_be_finite():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match="softmax_scale must be finite, got inf"):
        varlen(q, k, v, softmax_scale=float("inf"))
    with pytest.raises(TypeError, match="softmax_scale must be None or a number"):
        varlen(q, k, v, softmax_scale=torch.tensor(0.1))


def test_causal_must_be_bool():
    q, k, v = attention_inputs()
    with pytest.raises(TypeError, match="causal must be a bool"):
        varlen(q, k, v, causal=1)


# --------------------------------------------------------------------------------------------
# cross_attention


def ranges(start, end):
    return torch.tensor(start, dtype=torch.int32), torch.tensor(end, dtype=torch.int32)


def test_kv_range_outside_memory():
    q, k, v = attention_inputs(total_q=3, total_k=5)
    start, end = ranges([0, 1, 2], [5, 6, 3])
    outside = r"\[kv_start\[1\], kv_end\[1\]\) = \[1, 6\) lies outside the memory \[0, total_kv = 5\)"
    with pytest.raises(ValueError, match=outside):
        nk.cross_attention(q, k, v, start, end)


def test_kv_range_negative_start():
    q, k, v = attention_inputs(total_q=2, total_k=5)
    with pytest.raises(ValueError, match="lies outside the memory"):
        nk.cross_attention(q, k, v, *ranges([-1, 0], [2, 2]))


def test_kv_start_after_end():
    q, k, v = attention_inputs(total_q=3, total_k=5)
    with pytest.raises(ValueError, match=r"kv_start\[2\] = 4 is greater than kv_end\[2\] = 3"):
        nk.cross_attention(q, k, v, *ranges([0, 1, 4], [5, 1, 3]))


def test_kv_ranges_of_wrong_length():
    q, k, v = attention_inputs(total_q=3, total_k=5)
    with pytest.raises(ValueError, match=r"kv_end must have shape \(total_q,\) = \(3,\).*got \(2\)"):
        nk.cross_attention(q, k, v, torch.zeros(3, dtype=torch.int32), torch.ones(2, dtype=torch.int32))


def test_kv_ranges_must_be_int32():
    q, k, v = attention_inputs(total_q=3, total_k=5)
    with pytest.raises(TypeError, match="kv_start must be int32, got torch.int64"):
        nk.cross_attention(q, k, v, torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("gate_shape", [(3,), (4, 1), (2,)])
def test_gate_of_wrong_size(gate_shape):
    q, k, v = attention_inputs(total_q=3, total_k=5, hq=4)
    with pytest.raises(ValueError, match=r"gate must be a scalar or have shape \(nheads_q,\) = \(4,\)"):
        nk.cross_attention(q, k, v, *ranges([0, 0, 0], [5, 5, 5]), gate=torch.zeros(gate_shape))


def test_gate_of_wrong_type():
    q, k, v = attention_inputs(total_q=3, total_k=5)
    with pytest.raises(TypeError, match="gate must be None, a number or a tensor"):
        nk.cross_attention(q, k, v, *ranges([0, 0, 0], [5, 5, 5]), gate="0.5")


# --------------------------------------------------------------------------------------------
# multimodal_embed


def embed_inputs():
    ids = torch.tensor([[1, 9, 9, 2], [3, 9, 0, 4]])
    return ids, torch.randn(5, 3), torch.randn(3, 3)


def test_placeholder_count_must_match_image_rows():
    ids, table, images = embed_inputs()
    with pytest.raises(ValueError, match="input_ids hold 3 image placeholders .* image_embeds has 2 rows"):
        nk.multimodal_embed(ids, table, images[:2], 9)


@pytest.mark.parametrize("bad_id", [5, -1, 1000])
def test_ids_outside_the_table(bad_id):
    ids, table, images = embed_inputs()
    ids[0, 0] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids contain id {bad_id} outside the embedding table \[0, 5\)"):
        nk.multimodal_embed(ids, table, images, 9)


def test_float_ids():
    ids, table, images = embed_inputs()
    with pytest.raises(TypeError, match="input_ids must be an int32 or int64 tensor"):
        nk.multimodal_embed(ids.float(), table, images, 9)


def test_image_token_id_must_fit_the_id_dtype():
    ids, table, images = embed_inputs()
    with pytest.raises(ValueError, match=r"image_token_id = 4294967296 does not fit the torch.int32"):
        nk.multimodal_embed(ids.int(), table, images[:0], 2**32)


def test_image_rows_of_other_dtype_or_width():
    ids, table, images = embed_inputs()
    with pytest.raises(TypeError, match="image_embeds must have the dtype of embed_weight"):
        nk.multimodal_embed(ids, table, images.double(), 9)
    with pytest.raises(ValueError, match="image_embeds must have D = 3 columns"):
        nk.multimodal_embed(ids, table, torch.randn(3, 4), 9)


# --------------------------------------------------------------------------------------------
# pixel shuffle (+ LayerNorm)


def test_pixel_shuffle_needs_square_grid():
    with pytest.raises(ValueError, match="L = 35 tokens per tile, which is not a square grid"):
        nk.pixel_shuffle(torch.randn(1, 35, 4))


def test_pixel_shuffle_side_divisible_by_scale():
    with pytest.raises(ValueError, match="5x5 token grid is not divisible by scale = 2"):
        nk.pixel_shuffle(torch.randn(1, 25, 4))


def test_pixel_shuffle_grid_must_cover_tokens():
    with pytest.raises(ValueError, match="grid 4x8 has 32 cells but x has L = 36 tokens"):
        nk.pixel_shuffle(torch.randn(1, 36, 4), grid=(4, 8))


def test_pixel_shuffle_rank_and_scale():
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor \(N, L, C\)"):
        nk.pixel_shuffle(torch.randn(36, 4))
    with pytest.raises(TypeError, match="scale must be an int"):
        nk.pixel_shuffle(torch.randn(1, 36, 4), scale=2.0)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_layernorm_parameter_of_wrong_size(which):
    args = {"x": torch.randn(2, 36, 4), "weight": torch.randn(16), "bias": torch.randn(16)}
    args[which] = torch.randn(4)
    with pytest.raises(ValueError, match=rf"{which} must have shape \(16,\) = \(C \* scale\^2,\).*got \(4\)"):
        nk.pixel_shuffle_layernorm(**args)


def test_layernorm_eps():
    args = (torch.randn(2, 36, 4), torch.randn(16), torch.randn(16))
    with pytest.raises(ValueError, match="eps must be a finite non-negative number, got -1.0"):
        nk.pixel_shuffle_layernorm(*args, eps=-1.0)
    with pytest.raises(TypeError, match="eps must be a number, got str"):
        nk.pixel_shuffle_layernorm(*args, eps="1e-5")


def test_pixel_shuffle_needs_tokens():
    with pytest.raises(ValueError, match="at least one token and one channel"):
        nk.pixel_shuffle(torch.randn(2, 0, 4))


# --------------------------------------------------------------------------------------------
# when contents are checked


def test_contents_are_checked_on_cpu_and_on_other_devices_only_in_debug_mode(monkeypatch):
    monkeypatch.delenv("NVLM_KERNELS_DEBUG", raising=False)
    assert _validate.contents_checked(torch.zeros(1))
    meta = torch.zeros(1, device="meta")  # stands in for a GPU tensor: reading it is not free
    assert not _validate.contents_checked(meta)
    monkeypatch.setenv("NVLM_KERNELS_DEBUG", "1")
    assert _validate.contents_checked(meta)


def test_shape_errors_are_raised_for_device_tensors_without_reading_them(monkeypatch):
    monkeypatch.delenv("NVLM_KERNELS_DEBUG", raising=False)
    q, k, v = (t.to("meta") for t in attention_inputs(hq=5, hk=2))
    with pytest.raises(ValueError, match="must be a multiple"):
        nk.varlen_attention(q, k, v, cu(0, 6).to("meta"), cu(0, 6).to("meta"), 6, 6)


def bad_embed_call():
    ids, table, images = embed_inputs()
    ids[1, 2] = 1000
    return (ids, table, images, 9), r"input_ids contain id 1000 outside the embedding table \[0, 5\)"


def bad_varlen_call():
    q, k, v = attention_inputs()
    return (q, k, v, cu(0, 4, 1, 6), cu(0, 3, 6), 6, 6), "cu_seqlens_q must be non-decreasing"


def bad_cross_attention_call():
    q, k, v = attention_inputs(total_q=3, total_k=5)
    return (q, k, v, *ranges([0, 1, 2], [5, 6, 3])), r"lies outside the memory \[0, total_kv = 5\)"


@pytest.mark.parametrize("op,call", [(nk.multimodal_embed, bad_embed_call),
                                     (nk.varlen_attention, bad_varlen_call),
                                     (nk.cross_attention, bad_cross_attention_call)])
@pytest.mark.skipif(not _validate.CHECKS_SURVIVE_COMPILE,
                    reason="this torch has no effectful custom ops (CustomOpDef.register_effect)")
def test_cpu_contents_are_checked_under_torch_compile(op, call):
    args, message = call()
    with pytest.raises(ValueError, match=message):
        op(*args)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=message):
        torch.compile(op, backend="aot_eager")(*args)

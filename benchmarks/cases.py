"""The benchmark cases, in one place for the pytest benchmarks and the one-shot GPU check
(benchmarks/gpu_check.py): NVLM's real shapes, tiny stand-ins with the same structure for dry runs
on the CPU, input builders, the work each case does (useful FLOPs or ideal bytes), and the outside
baselines each kernel is judged against.

Attention packs (varlen_attention):
  sft-d128 / sft-d64: NVLM-D SFT rows of mixed-length samples (256..1792 image tokens + text),
      causal; 32 query / 8 key heads x 128 (72B-like) and 14 / 2 x 64 (Qwen2-0.5B, GQA 7);
  vit-7x1024: the ViT over 7 tiles x 1024 tokens, non-causal, 25 heads x 128 (InternViT-6B).
Cross-attention layouts (cross_attention, head dim 128, 64 query heads over 8 key heads), built
with nvlm_kernels.cross_attention_ranges as the model builds them:
  nvlm-x: 8 samples x 1024 text tokens; each memory is 7 tiles x 256 image tokens; text before the
      image sees nothing, each tile tag's tokens see their own tile, the rest sees all 7 tiles;
  nvlm-h: each memory interleaves embed(<tile_k>) (4 tokens) with tile k, and every token from
      the image on sees the whole memory.
Memory-bound ops at NVLM's shapes: pixel shuffle (+ LayerNorm) of 7 tiles x 1024 InternViT-6B
tokens x 3200 channels; multimodal_embed of 8 x 4096 SFT tokens, 40 % image rows, V = 152064,
with uniform text ids and with SFT-like ids (Zipf plus template ids repeated thousands of times,
the table gradient's long runs).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import nvlm_kernels as nk


class Unavailable(Exception):
    """A baseline that cannot run here (not installed, wrong torch); the message says why."""


# --------------------------------------------------------------------------------------------
# varlen attention


@dataclass(frozen=True)
class AttentionPack:
    name: str
    lengths: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    @property
    def groups(self) -> int:
        return self.heads_q // self.heads_kv

    def useful_flops(self, mode: str = "forward") -> int:
        """QK^T and PV over the visible pairs only; the backward does 2.5x the forward's matmul
        work (dV, dP, dQ, dK and the recomputed QK^T)."""
        n = self.lengths
        pairs = sum(x * (x + 1) // 2 if self.causal else x * x for x in n)
        forward = 4 * pairs * self.heads_q * self.head_dim
        return forward if mode == "forward" else int(3.5 * forward)


_SFT_LENGTHS = (2400, 800, 1500, 1100, 600, 2000, 1200)
VARLEN_PACKS = {p.name: p for p in (
    AttentionPack("sft-d64", _SFT_LENGTHS, 14, 2, 64, True),
    AttentionPack("vit-7x1024", (1024,) * 7, 25, 25, 128, False),
    AttentionPack("sft-d128", _SFT_LENGTHS, 32, 8, 128, True),
)}
# the same structure at interpreter-friendly sizes (an empty sequence, GQA 7, odd lengths)
TINY_VARLEN_PACKS = {p.name: p for p in (
    AttentionPack("tiny-sft-d32", (37, 0, 20, 9), 7, 1, 32, True),
    AttentionPack("tiny-vit", (16,) * 3, 2, 2, 32, False),
)}


def varlen_inputs(pack: AttentionPack, device: str, dtype: torch.dtype,
                  requires_grad: bool = False, seed: int = 0) -> dict:
    """Keyword arguments of nk.varlen_attention for `pack`, fresh random q, k, v."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(pack.lengths)
    q, k, v = (torch.randn(total, heads, pack.head_dim, generator=generator)
               .to(device=device, dtype=dtype).requires_grad_(requires_grad)
               for heads in (pack.heads_q, pack.heads_kv, pack.heads_kv))
    cu = torch.tensor((0,) + pack.lengths).cumsum(0).to(device=device, dtype=torch.int32)
    longest = max(pack.lengths)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                max_seqlen_k=longest, causal=pack.causal)


def torch_varlen_attention() -> Callable:
    """torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside torch) as a function of
    nk.varlen_attention's arguments. Its signature moved between releases: causal was
    `is_causal=` until pytorch#172245 and is `window_size=(-1, 0)` since (torch 2.11); GQA
    (`enable_gqa`) arrived in 2.12, before that K and V are repeated per query head."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        raise Unavailable("torch.nn.attention.varlen is not in this torch")
    from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415

    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters and "is_causal" not in parameters:
        raise Unavailable(f"varlen_attn{inspect.signature(varlen_attn)}: no causal argument known")

    def run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
            softmax_scale=None):
        kwargs = {"scale": softmax_scale}
        if "window_size" in parameters:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           **kwargs)
    return run


VARLEN_BASELINES = ("torch_varlen", "sdpa_loop", "sdpa_padded", "flex", "flash_attn")


def varlen_baseline(impl: str, pack: AttentionPack, device: str) -> Callable:
    """A baseline as a function of nk.varlen_attention's keyword arguments (setup such as
    FlexAttention's block mask is done here, outside any timing)."""
    lengths, gqa = pack.lengths, pack.groups > 1
    if impl == "torch_varlen":
        return torch_varlen_attention()
    if impl == "sdpa_loop":
        def sdpa_loop(q, k, v, causal, **_):
            outs, start = [], 0
            for n in lengths:
                qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=causal, enable_gqa=gqa).transpose(0, 1))
                start += n
            return torch.cat(outs)
        return sdpa_loop
    if impl == "sdpa_padded":
        batch, longest = len(lengths), max(lengths)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        rows = torch.repeat_interleave(torch.arange(batch, device=device),
                                       torch.tensor(lengths, device=device))

        def sdpa_padded(q, k, v, causal, **_):
            def padded(t):
                out = t.new_zeros(batch, longest, t.shape[1], t.shape[2])
                out[rows, positions] = t
                return out.transpose(1, 2)
            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v),
                                                 is_causal=causal, enable_gqa=gqa)
            return out.transpose(1, 2)[rows, positions]
        return sdpa_padded
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

        document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           torch.tensor(lengths, device=device))
        causal = pack.causal

        def mask_mod(b, h, q_idx, kv_idx):
            same = document[q_idx] == document[kv_idx]
            return same & (kv_idx <= q_idx) if causal else same

        total = sum(lengths)
        block_mask = create_block_mask(mask_mod, None, None, total, total, device=device)
        flex = compiled_flex_attention(device)

        def flex_packed(q, k, v, **_):
            out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask,
                       enable_gqa=gqa)
            return out[0].transpose(0, 1)
        return flex_packed
    if impl == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise Unavailable("flash_attn is not installed")
        from flash_attn import flash_attn_varlen_func  # noqa: PLC0415

        def flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
            return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal=causal)
        return flash
    raise ValueError(f"unknown varlen baseline {impl!r}")


_FLEX = None


def compiled_flex_attention(device: str | torch.device) -> Callable:
    """One torch.compile of flex_attention per process: a new compile per case would exceed
    dynamo's recompile limit, after which flex falls back to eager and materializes every score.
    On the CPU (dry runs) the uncompiled function: the same arguments, no minutes of C++ builds."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    if torch.device(device).type != "cuda":
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# --------------------------------------------------------------------------------------------
# cross attention


@dataclass(frozen=True)
class CrossLayout:
    name: str
    samples: int
    text: int
    tiles: int
    tile_tokens: int
    tag_tokens: int          # NVLM-H: tokens of each embedded <tile_k> in the memory
    heads_q: int
    heads_kv: int
    head_dim: int
    text_before_image: int
    hybrid: bool             # NVLM-H (whole memory after the image start) or NVLM-X (tile tags)

    @property
    def memory_per_sample(self) -> int:
        return self.tiles * (self.tile_tokens + (self.tag_tokens if self.hybrid else 0))


CROSS_LAYOUTS = {lay.name: lay for lay in (
    CrossLayout("nvlm-x", 8, 1024, 7, 256, 4, 64, 8, 128, 16, hybrid=False),
    CrossLayout("nvlm-h", 8, 1024, 7, 256, 4, 64, 8, 128, 16, hybrid=True),
)}
TINY_CROSS_LAYOUTS = {lay.name: lay for lay in (
    CrossLayout("tiny-x", 2, 40, 3, 8, 2, 4, 2, 32, 5, hybrid=False),
    CrossLayout("tiny-h", 2, 40, 3, 8, 2, 4, 2, 32, 5, hybrid=True),
)}


def cross_ranges(layout: CrossLayout, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end) of `layout`, one image per sample."""
    lay = layout
    positions = torch.arange(lay.text)
    in_image = positions >= lay.text_before_image
    tag = (positions - lay.text_before_image - 1).div(lay.tag_tokens, rounding_mode="floor")
    in_tag = (positions > lay.text_before_image) & (tag < lay.tiles)   # after the <Image> token
    sample_index = torch.arange(lay.samples).repeat_interleave(lay.text)
    image_index = torch.where(in_image.repeat(lay.samples), sample_index, -1)
    memory_offsets = torch.arange(lay.samples + 1) * lay.memory_per_sample
    kwargs = {}
    if not lay.hybrid:
        tile_index = torch.where(in_tag, tag, -1).repeat(lay.samples)
        tile_index = torch.where(tile_index >= 0, tile_index + sample_index * lay.tiles, -1)
        kwargs = {"tile_index": tile_index,
                  "tile_offsets": torch.arange(lay.samples * lay.tiles + 1) * lay.tile_tokens}
    start, end = nk.cross_attention_ranges(sample_index, image_index, memory_offsets, **kwargs)
    return start.to(device), end.to(device)


def cross_inputs(layout: CrossLayout, device: str, dtype: torch.dtype,
                 requires_grad: bool = False, seed: int = 0) -> dict:
    """Keyword arguments of nk.cross_attention for `layout` (a learned scalar tanh gate)."""
    generator = torch.Generator().manual_seed(seed)
    start, end = cross_ranges(layout, device)
    total_kv = layout.samples * layout.memory_per_sample
    q = torch.randn(layout.samples * layout.text, layout.heads_q, layout.head_dim,
                    generator=generator)
    k, v = (torch.randn(total_kv, layout.heads_kv, layout.head_dim, generator=generator)
            for _ in range(2))
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v))
    gate = torch.tensor([0.3], device=device, requires_grad=requires_grad)
    return dict(q=q, k=k, v=v, kv_start=start, kv_end=end, gate=gate)


def cross_flops(inputs: dict, mode: str = "forward") -> int:
    """Visible (query, key) pairs only."""
    q, start, end = inputs["q"], inputs["kv_start"], inputs["kv_end"]
    forward = 4 * int((end - start).sum()) * q.shape[1] * q.shape[2]
    return forward if mode == "forward" else int(3.5 * forward)


CROSS_BASELINES = ("eager_sdpa_mask", "flex")


def cross_baseline(impl: str, layout: CrossLayout, kv_start: torch.Tensor,
                   kv_end: torch.Tensor) -> Callable:
    """A baseline as a function of nk.cross_attention's keyword arguments."""
    lay, device = layout, kv_start.device
    samples, per_sample, groups = lay.samples, lay.memory_per_sample, lay.heads_q // lay.heads_kv
    if impl == "eager_sdpa_mask":
        # Llama-3.2-Vision style: per-sample batch, K/V repeated per query head, SDPA with a
        # dense additive mask over the sample's memory, rows with no key zeroed, then the gate
        base = torch.arange(samples, device=device)[:, None] * per_sample
        local_start = (kv_start.view(samples, lay.text) - base).clamp(min=0)
        local_end = (kv_end.view(samples, lay.text) - base).clamp(min=0)
        keys = torch.arange(per_sample, device=device)
        visible = (keys >= local_start[..., None]) & (keys < local_end[..., None])
        has_keys = visible.any(-1)[:, None, :, None]

        def eager(q, k, v, gate, **_):
            bias = torch.zeros(visible.shape, device=device, dtype=q.dtype)
            bias = bias.masked_fill(~visible, torch.finfo(q.dtype).min)[:, None]
            qb = q.view(samples, lay.text, lay.heads_q, lay.head_dim).transpose(1, 2)
            kb, vb = (t.view(samples, per_sample, lay.heads_kv, lay.head_dim)
                      .repeat_interleave(groups, 2).transpose(1, 2) for t in (k, v))
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias) * has_keys
            out = out * torch.tanh(gate).to(out.dtype)
            return out.transpose(1, 2).reshape(q.shape)
        return eager
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

        block_mask = create_block_mask(mask_mod, None, None, kv_start.numel(),
                                       samples * per_sample, device=str(device))
        flex = compiled_flex_attention(device)
        has_keys = (kv_end > kv_start)[:, None, None]

        def flex_packed(q, k, v, gate, **_):
            out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask,
                       enable_gqa=groups > 1)[0].transpose(0, 1)
            return out * has_keys * torch.tanh(gate).to(out.dtype)
        return flex_packed
    raise ValueError(f"unknown cross-attention baseline {impl!r}")


# --------------------------------------------------------------------------------------------
# memory-bound ops


@dataclass(frozen=True)
class MemoryCase:
    """One memory-bound op at one shape: `inputs(device, dtype, requires_grad)` gives the tensor
    arguments (named `arg_names`; `fixed` holds the op's other arguments) that both `eager` and
    `kernel` take; `grad_inputs` are the indices of the arguments with gradients; `bytes` is what
    an ideal fused kernel reads and writes per mode (the figure of merit is bytes / time against
    the card's copy bandwidth)."""

    op: str
    shape: str
    arg_names: tuple[str, ...]
    fixed: dict
    inputs: Callable[[str, torch.dtype, bool], tuple]
    eager: Callable
    grad_inputs: tuple[int, ...]
    bytes: Callable[[torch.dtype], dict[str, int]]

    def kwargs(self, args: tuple) -> dict:
        """The public op's keyword arguments (for nvlm_kernels.testing's comparisons)."""
        return {**dict(zip(self.arg_names, args)), **self.fixed}

    def kernel(self, *args):
        """The nk op on whichever backend is selected around the call."""
        return getattr(nk, self.op)(**self.kwargs(args))


def _pixel_shuffle_case(tiles: int, tokens: int, channels: int, scale: int = 2,
                        layernorm: bool = False) -> MemoryCase:
    side, width = int(tokens ** 0.5), channels * scale * scale

    def shuffled(x):
        y = x.view(tiles, side // scale, scale, side // scale, scale, channels)
        return y.permute(0, 1, 3, 2, 4, 5).contiguous().view(tiles, tokens // scale**2, width)

    def elements(dtype):
        return tiles * tokens * channels * dtype.itemsize

    shape = f"{tiles}x{tokens}x{channels}"
    if not layernorm:
        def inputs(device, dtype, requires_grad):
            return (torch.randn(tiles, tokens, channels, device=device, dtype=dtype,
                                requires_grad=requires_grad),)
        # forward: read x, write out; backward: read grad, write dx
        return MemoryCase("pixel_shuffle", shape, ("x",), {"scale": scale}, inputs, shuffled,
                          (0,), lambda dt: {"forward": 2 * elements(dt),
                                            "forward+backward": 4 * elements(dt)})

    def inputs(device, dtype, requires_grad):
        x = torch.randn(tiles, tokens, channels, device=device, dtype=dtype)
        weight, bias = (torch.randn(width, device=device, dtype=dtype) for _ in range(2))
        return tuple(t.requires_grad_(requires_grad) for t in (x, weight, bias))

    def eager(x, weight, bias):
        return F.layer_norm(shuffled(x), (width,), weight, bias, 1e-5)

    # forward: read x, write out; backward: read grad and x, write dx (weight/bias are noise)
    return MemoryCase("pixel_shuffle_layernorm", shape, ("x", "weight", "bias"),
                      {"eps": 1e-5, "scale": scale}, inputs, eager, (0, 1, 2),
                      lambda dt: {"forward": 2 * elements(dt),
                                  "forward+backward": 5 * elements(dt)})


def _text_ids(rows: int, tokens: int, vocab: int, distribution: str,
              generator: torch.Generator) -> torch.Tensor:
    """Text ids: "uniform" over the table, or "sft" as real SFT batches look to the table
    gradient: Zipf-like (p ~ 1 / rank^1.1, like word counts) plus a few ids repeated thousands of
    times (chat-template tokens, newlines, padding: 3 ids x 1/16 of the tokens each)."""
    if distribution == "uniform":
        return torch.randint(0, vocab - 1, (rows, tokens), generator=generator)
    weights = 1.0 / torch.arange(1, vocab, dtype=torch.float64) ** 1.1
    ids = torch.multinomial(weights, rows * tokens, replacement=True, generator=generator)
    template = torch.randperm(rows * tokens, generator=generator)[: 3 * rows * tokens // 16]
    # Qwen2's <|im_start|>, "\n" and <|endoftext|> (any three ids would do; kept in the table)
    template_ids = torch.tensor([151644, 198, 151643]) % (vocab - 1)
    ids[template] = template_ids[torch.arange(template.numel()) % 3]
    return ids.view(rows, tokens)


def _multimodal_embed_case(rows: int, tokens: int, vocab: int, width: int,
                           image_fraction: float = 0.4, ids: str = "uniform",
                           sparse_grad: bool = False) -> MemoryCase:
    image_token = vocab - 1
    distribution = ids

    def inputs(device, dtype, requires_grad):
        generator = torch.Generator().manual_seed(0)
        ids = _text_ids(rows, tokens, vocab, distribution, generator)
        ids[torch.rand(rows, tokens, generator=generator) < image_fraction] = image_token
        table = torch.randn(vocab, width, device=device, dtype=dtype, requires_grad=requires_grad)
        images = torch.randn(int((ids == image_token).sum()), width, device=device, dtype=dtype,
                             requires_grad=requires_grad)
        return ids.to(device), table, images

    def eager(ids, table, images):
        is_image = ids == image_token
        text = F.embedding(ids.masked_fill(is_image, 0), table, sparse=sparse_grad)
        return text.masked_scatter(is_image.unsqueeze(-1), images)

    def nbytes(dtype):
        row_bytes = rows * tokens * width * dtype.itemsize
        # forward: read one row per token (table or image), write it; backward: read grad, write
        # image and table rows. The dense table gradient also zeroes the rest of the table:
        # that memset (V x width: 2.5 GB at 72B's 152064 x 8192 bf16) dwarfs the rows both sides
        # move, so dense forward + backward cannot beat eager by more than ~1.2-1.3x whatever
        # the kernel does. sparse_grad (nvlm_kernels/_sparse_embedding.py) makes no (V, D)
        # tensor: its rows ("-sparse") are the traffic of the tokens alone, eager's as
        # F.embedding(sparse=True).
        table_memset = 0 if sparse_grad else vocab * width * dtype.itemsize
        return {"forward": 2 * row_bytes, "forward+backward": 4 * row_bytes + table_memset}

    suffix = ("" if distribution == "uniform" else f"-{distribution}") + (
        "-sparse" if sparse_grad else "")
    fixed = {"image_token_id": image_token, **({"sparse_grad": True} if sparse_grad else {})}
    return MemoryCase("multimodal_embed", f"{rows}x{tokens}x{width}{suffix}",
                      ("input_ids", "embed_weight", "image_embeds"), fixed, inputs, eager, (1, 2),
                      nbytes)


def memory_cases(size: str, device: str) -> list[MemoryCase]:
    """size "real": NVLM's shapes (the embed width is 8192 on a GPU, 72B, and 896 on the CPU,
    Qwen2-0.5B, so the fp32 table fits); "tiny": the same ops at dry-run sizes."""
    if size == "tiny":
        return [_pixel_shuffle_case(3, 16, 24), _pixel_shuffle_case(3, 16, 24, layernorm=True),
                _multimodal_embed_case(2, 23, 50, 40), _multimodal_embed_case(2, 23, 50, 40, ids="sft"),
                _multimodal_embed_case(2, 23, 50, 40, ids="sft", sparse_grad=True)]
    width = 8192 if device == "cuda" else 896
    return [_pixel_shuffle_case(7, 1024, 3200), _pixel_shuffle_case(7, 1024, 3200, layernorm=True),
            _multimodal_embed_case(8, 4096, 152064, width),
            _multimodal_embed_case(8, 4096, 152064, width, ids="sft"),
            _multimodal_embed_case(8, 4096, 152064, width, ids="sft", sparse_grad=True)]

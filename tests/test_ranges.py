"""cross_attention_ranges against masks built token by token from the rules of docs/nvlm.md section 8."""

from __future__ import annotations

import random

import pytest
import torch

import nvlm_kernels as nk


def build_layout(samples, tokens_per_tile=3, tag_len=2, span_extra=2):
    """samples: lists of ("text", n) / ("image", num_tiles) segments. Returns the helper's inputs
    and, per token, what it may see by the rules (written out with plain Python)."""
    sample_index, image_index, tile_index = [], [], []
    memory_offsets, tile_offsets = [0], [0]
    token_rule = []          # ("none",) / ("image", i) / ("tile", g)
    image, tile = 0, 0
    for s, segments in enumerate(samples):
        latest = None
        for kind, n in segments:
            if kind == "text":
                for _ in range(n):
                    sample_index.append(s); image_index.append(-1); tile_index.append(-1)
                    token_rule.append(("image", latest) if latest is not None else ("none",))
                continue
            latest = image
            first_tile = tile
            # <Image>, then per tile its tag tokens (the placeholders of NVLM-D are absent in X),
            # then </Image>
            for _ in range(span_extra // 2):
                sample_index.append(s); image_index.append(image); tile_index.append(-1)
                token_rule.append(("image", image))
            for k in range(n):
                for _ in range(tag_len):
                    sample_index.append(s); image_index.append(image); tile_index.append(first_tile + k)
                    token_rule.append(("tile", first_tile + k))
                tile_offsets.append(tile_offsets[-1] + tokens_per_tile)
            for _ in range(span_extra - span_extra // 2):
                sample_index.append(s); image_index.append(image); tile_index.append(-1)
                token_rule.append(("image", image))
            tile += n
            memory_offsets.append(memory_offsets[-1] + n * tokens_per_tile)
            image += 1
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return (t(sample_index), t(image_index), t(memory_offsets), t(tile_index), t(tile_offsets),
            token_rule)


def expected_mask(token_rule, memory_offsets, tile_offsets, arch):
    rows = []
    total = int(memory_offsets[-1])
    for rule in token_rule:
        row = [False] * total
        if rule[0] == "tile" and arch == "X":
            lo, hi = int(tile_offsets[rule[1]]), int(tile_offsets[rule[1] + 1])
        elif rule[0] == "tile":      # H has no per-tile rule: the tag is image text like any other
            image = next(i for i in range(len(memory_offsets) - 1)
                         if int(tile_offsets[rule[1]]) < int(memory_offsets[i + 1]))
            lo, hi = int(memory_offsets[image]), int(memory_offsets[image + 1])
        elif rule[0] == "image":
            lo, hi = int(memory_offsets[rule[1]]), int(memory_offsets[rule[1] + 1])
        else:
            lo = hi = 0
        for j in range(lo, hi):
            row[j] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(token_rule), total)


def mask_of(kv_start, kv_end, total):
    keys = torch.arange(total)[None, :]
    return (keys >= kv_start.long()[:, None]) & (keys < kv_end.long()[:, None])


LAYOUTS = {
    "text before, between and after images": [
        [("text", 3), ("image", 3), ("text", 4), ("image", 1), ("text", 2)],
        [("text", 5)],
        [("image", 7), ("text", 3)],
    ],
    "an image first in every sample": [[("image", 2), ("text", 1)], [("image", 1), ("text", 2)]],
    "no image at all": [[("text", 4)], [("text", 1)]],
}


@pytest.mark.parametrize("arch", ["X", "H"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ranges_equal_the_rules(arch, layout):
    sample, image, mem, tile, tiles, rules = build_layout(LAYOUTS[layout])
    kwargs = {"tile_index": tile, "tile_offsets": tiles} if arch == "X" else {}
    kv_start, kv_end = nk.cross_attention_ranges(sample, image, mem, **kwargs)
    assert kv_start.dtype == kv_end.dtype == torch.int32
    total = int(mem[-1])
    assert torch.equal(mask_of(kv_start, kv_end, total), expected_mask(rules, mem, tiles, arch))
    # empty ranges are (0, 0), inside the memory
    assert bool(((kv_start <= kv_end) & (kv_end <= total)).all())


def test_random_layouts():
    rng = random.Random(0)
    for _ in range(20):
        samples = [[(rng.choice(["text", "image"]), rng.randint(1, 7)) for _ in range(rng.randint(1, 5))]
                   for _ in range(rng.randint(1, 4))]
        sample, image, mem, tile, tiles, rules = build_layout(samples, tokens_per_tile=rng.randint(1, 4))
        for arch in ("X", "H"):
            kwargs = {"tile_index": tile, "tile_offsets": tiles} if arch == "X" else {}
            kv_start, kv_end = nk.cross_attention_ranges(sample, image, mem, **kwargs)
            assert torch.equal(mask_of(kv_start, kv_end, int(mem[-1])),
                               expected_mask(rules, mem, tiles, arch))


def test_ranges_drive_cross_attention_like_a_dense_mask():
    sample, image, mem, tile, tiles, rules = build_layout(LAYOUTS["text before, between and after images"])
    kv_start, kv_end = nk.cross_attention_ranges(sample, image, mem, tile, tiles)
    total_q, total_kv = sample.numel(), int(mem[-1])
    q, k, v = torch.randn(total_q, 4, 16), torch.randn(total_kv, 2, 16), torch.randn(total_kv, 2, 16)
    out = nk.cross_attention(q, k, v, kv_start, kv_end)
    mask = expected_mask(rules, mem, tiles, "X")
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / 4.0
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(out, torch.einsum("hqk,khd->qhd", probs, vv), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    sample, image, mem, tile, tiles, _ = build_layout(LAYOUTS["an image first in every sample"])
    with pytest.raises(ValueError, match="tile_index and tile_offsets"):
        nk.cross_attention_ranges(sample, image, mem, tile_index=tile)
    with pytest.raises(ValueError, match="image_index"):
        nk.cross_attention_ranges(sample, image[:-1], mem)
    with pytest.raises(ValueError, match="num_images"):
        nk.cross_attention_ranges(sample, image, mem[:-1])
    with pytest.raises(TypeError, match="sample_index"):
        nk.cross_attention_ranges(sample.float(), image, mem)

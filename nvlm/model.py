"""The NVLM family: InternViT -> pixel shuffle + projector -> image rows, which
- NVLM-D writes into the decoder's input over the image placeholders;
- NVLM-X puts into a memory that gated X-attn blocks (nvlm.xattn) before some decoder layers read;
- NVLM-H splits: each image's thumbnail into the decoder, its regular tiles (interleaved with the
  embedded tile tags) into the X-attn memory.

    model = NVLM(NVLMConfig.from_preset("tiny")); model.init_weights()
    out = model(input_ids, pixel_values, labels)      # out.logits, out.loss
    out = model(batch.input_ids, batch.pixel_values, batch.labels, cu_seqlens=batch.cu_seqlens,
                xattn=batch.xattn)                    # NVLM-X/H: which rows go where

Parameter names follow the public NVLM-D / InternVL checkpoints (`vision_model.*`, `mlp1.*`,
`language_model.model.*`, `language_model.lm_head.*`); nvlm.checkpoint reads and writes them.

Inputs come in two forms, both turned into one packed layout (nvlm.packing.PackedLayout):
- rows: input_ids (B, L), each row one sequence; an optional attention_mask (B, L) marks padding
  (left or right), which is dropped before the decoder and gets zero logits;
- packed: input_ids (T,) or (1, T) holding several samples back to back, with cu_seqlens (B + 1,)
  int32 and optionally position_ids (T,) (default: restarting at 0 in every sample).
pixel_values (N, 3, S, S) hold all tiles of all images, in the order their placeholders appear.
NVLM-X/H also take `xattn` (nvlm.packing.XAttnInputs, built by nvlm.packing.pack_samples): which
tiles go to the decoder and which to the memory, and each token's range of memory rows.

Shape legend: N tiles, P patches per tile, C ViT width, Q = P / 4 image tokens per tile,
T packed tokens, D LLM width, V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import nvlm_kernels

from .config import NVLMConfig
from .errors import InputError
from .layers import init_linear, nvtx_range
from .llm import Qwen2ForCausalLM
from .packing import (IGNORE_INDEX, PackedLayout, XAttnInputs, next_token_targets, token_packer,
                      sample_positions)
from .vision import InternVisionModel
from .xattn import XAttnBlock


@dataclass
class NVLMOutput:
    """logits: input_ids' shape + (V,) (None when not asked for); loss: mean cross-entropy of the
    next-token predictions whose target label is not IGNORE_INDEX (None without labels);
    num_label_tokens: how many targets the mean covers (to weight accumulated or sharded losses)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    num_label_tokens: int = 0


class Projector(nn.Sequential):
    """mlp1: LayerNorm(4C) -> Linear(4C, hidden) -> GELU -> Linear(hidden, D), or, with one layer,
    LayerNorm(4C) -> Linear(4C, D). The pixel shuffle and the LayerNorm run as one fused kernel."""

    def __init__(self, config: NVLMConfig) -> None:
        scale = config.projector.downsample_scale
        shuffled = config.vision.hidden_size * scale * scale
        p, d_model = config.projector, config.llm.hidden_size
        if p.num_layers == 2:
            layers = [nn.LayerNorm(shuffled, eps=p.layernorm_eps),
                      nn.Linear(shuffled, p.hidden_size, bias=p.bias), nn.GELU(),
                      nn.Linear(p.hidden_size, d_model, bias=p.bias)]
        else:
            layers = [nn.LayerNorm(shuffled, eps=p.layernorm_eps),
                      nn.Linear(shuffled, d_model, bias=p.bias)]
        super().__init__(*layers)
        self.scale = scale

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        norm = self[0]
        x_NQ4C = nvlm_kernels.pixel_shuffle_layernorm(
            x_NPC, norm.weight, norm.bias, eps=norm.eps, scale=self.scale)
        for layer in list(self)[1:]:
            x_NQ4C = layer(x_NQ4C)
        return x_NQ4C


class NVLM(nn.Module):
    """NVLM-D, -X or -H (docs/nvlm.md section 1), by config.arch. X and H hold their X-attn blocks in
    `xattn`, keyed by the index of the decoder layer they precede."""

    def __init__(self, config: NVLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = Projector(config)
        self.language_model = Qwen2ForCausalLM(config.llm)
        if config.arch != "D":
            self.xattn = nn.ModuleDict({str(i): XAttnBlock(config.llm)
                                        for i in config.xattn_layers})

    @property
    def has_xattn(self) -> bool:
        return self.config.arch != "D"

    # ----------------------------------------------------------------------------------------
    # Construction helpers

    def init_weights(self) -> None:
        """Fresh random weights (normal(0, 0.02) matrices, zero biases, unit norms, LayerScale at
        its configured value). Separate from __init__ so a model can be built on the meta device
        and materialised (or loaded) later."""
        self.vision_model.init_weights()
        for module in self.mlp1:
            if isinstance(module, nn.Linear):
                init_linear(module)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        self.language_model.init_weights()
        if self.has_xattn:
            for block in self.xattn.values():
                block.init_weights()

    def num_params(self, include_dummy_heads: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count. The model holds no zero-padded ViT heads; include_dummy_heads adds
        what a checkpoint that pads them (NVLM-D-72B: 25 -> 32 heads) stores on top."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.language_model.model.embed_tokens.weight.numel()
        if include_dummy_heads:
            v = self.config.vision
            padded = v.num_dummy_heads * v.head_dim
            # per layer: qkv rows (+ their biases), proj input columns, q/k-norm weights
            per_layer = 3 * padded * v.hidden_size + padded * v.hidden_size
            per_layer += 3 * padded * v.qkv_bias + 2 * padded * v.qk_normalization
            total += per_layer * v.num_layers
        return total

    @classmethod
    def from_pretrained(cls, path, image_token_id: int | None = None, **kwargs) -> "NVLM":
        """Load a checkpoint directory in the NVLM-D / InternVL layout (see nvlm.checkpoint)."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, image_token_id=image_token_id, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write config.json + safetensors in the layout from_pretrained reads (kwargs: see
        nvlm.checkpoint.save_pretrained, e.g. max_shard_bytes)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    # ----------------------------------------------------------------------------------------
    # Forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, S, S) -> image rows (N, Q, D), tile by tile.

        N may be 0: the ViT and the projector still run (on no rows), so that every rank of a
        sharded data-parallel run gathers the same parameters and gets (zero) gradients for them
        even when its batch holds no image.
        """
        vision_trainable = any(p.requires_grad for p in self.vision_model.parameters())
        # NVLM keeps the ViT frozen in every stage: then no activations are kept for a backward.
        with nvtx_range("vision"), torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
            x_NPC = self.vision_model(pixel_values)
        with nvtx_range("projector"):
            return self.mlp1(x_NPC)

    def image_rows(self, pixel_values: torch.Tensor | None, xattn: XAttnInputs | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows for the decoder's placeholders (M_d, D), X-attn memory (M, D) or None for
        NVLM-D): D sends every tile to the decoder; X and H route the tiles as xattn says."""
        table = self.language_model.model.embed_tokens.weight
        no_rows = table.new_zeros(0, table.shape[1])
        tiles_NQD = None
        if pixel_values is not None:
            tiles_NQD = self.encode_images(pixel_values).to(table.dtype)
        if not self.has_xattn:
            if xattn is not None:
                raise InputError("xattn: only NVLM-X/H models take X-attn inputs; this one is "
                                 "NVLM-D")
            return (no_rows if tiles_NQD is None else tiles_NQD.flatten(0, 1)), None
        if tiles_NQD is None:
            return no_rows, no_rows
        if xattn is None:
            if tiles_NQD.shape[0] == 0:
                return no_rows, no_rows
            raise InputError(f"xattn: NVLM-{self.config.arch} needs the X-attn inputs of its "
                             "images (the `xattn` of nvlm.packing.pack_samples) to know which "
                             "tiles go to the decoder and which to the memory")
        decoder_MD = tiles_NQD[xattn.decoder_tiles].flatten(0, 1)
        memory_MD = tiles_NQD[xattn.memory_tiles].flatten(0, 1)
        if xattn.memory_ids is not None:   # NVLM-H: embed(<tile_k>) interleaved with tile k
            memory_MD = nvlm_kernels.multimodal_embed(xattn.memory_ids, table, memory_MD,
                                                      self.config.image_token_id)
        return decoder_MD, memory_MD

    def embed(self, input_ids: torch.Tensor, image_rows_MD: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (ids' shape + (D,)) with the image rows over the placeholders."""
        table = self.language_model.model.embed_tokens.weight
        if image_rows_MD is None:
            image_rows_MD = table.new_zeros(0, table.shape[1])
        return nvlm_kernels.multimodal_embed(input_ids, table, image_rows_MD,
                                             self.config.image_token_id)

    def memory_cache(self, memory_MD: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every X-attn block's keys and values of the memory: computed once per prompt batch in
        generation, then read by the prefill and every decode step."""
        return {int(i): block.memory_kv(memory_MD) for i, block in self.xattn.items()}

    def xattn_hooks(self, memory: torch.Tensor | dict[int, tuple[torch.Tensor, torch.Tensor]],
                    kv_start: torch.Tensor, kv_end: torch.Tensor
                    ) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """The decoder's `before_layer` functions (NVLM-X/H): each X-attn block over the memory
        (rows, or the `memory_cache` of them) with the tokens' ranges."""
        return {int(i): functools.partial(block, memory=memory if isinstance(memory, torch.Tensor)
                                          else memory[int(i)], kv_start=kv_start, kv_end=kv_end)
                for i, block in self.xattn.items()}

    def xattn_ranges(self, xattn: XAttnInputs | None, ids_T: torch.Tensor,
                     pack: Callable[[torch.Tensor, str], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each packed token's X-attn key range [kv_start, kv_end) (NVLM-X/H): xattn's, put in the
        packed order by `pack` (token_packer), or empty for every token without xattn (text alone
        sees no memory)."""
        if xattn is None:
            empty = torch.zeros_like(ids_T, dtype=torch.int32)
            return empty, empty
        return pack(xattn.kv_start, "xattn.kv_start"), pack(xattn.kv_end, "xattn.kv_end")

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                max_seqlen: int | None = None, xattn: XAttnInputs | None = None,
                return_logits: bool = True) -> NVLMOutput:
        """Logits and (with labels) the next-token loss. labels has input_ids' shape and holds the
        token to predict at each position (= input_ids on answer tokens) or IGNORE_INDEX; targets
        never cross from one packed sample into the next. NVLM-X/H take `xattn` with their images
        (text alone needs none: no token then sees any memory)."""
        ids_T, layout, scatter_back = _packed_layout(input_ids, attention_mask, cu_seqlens,
                                                     position_ids, max_seqlen)
        packed = token_packer(input_ids, scatter_back)
        decoder_MD, memory_MD = self.image_rows(pixel_values, xattn)
        h_TD = self.embed(ids_T, decoder_MD)
        hooks = None
        if self.has_xattn:
            hooks = self.xattn_hooks(memory_MD, *self.xattn_ranges(xattn, ids_T, packed))
        targets_T = has_target = target_rows = None
        count = 0
        if labels is not None:
            targets_T = next_token_targets(packed(labels, "labels"), layout.cu_seqlens)
            has_target = targets_T != IGNORE_INDEX
            count = int(has_target.sum())
            if not return_logits and count:
                # Only the targets' hidden states are read: the last layer runs there alone.
                target_rows = has_target.nonzero().squeeze(1)
        with nvtx_range("decoder"):   # (T, D), or (R, D) at the target rows alone
            h = self.language_model(h_TD, layout, before_layer=hooks, output_rows=target_rows)

        loss = None
        if targets_T is not None:
            loss = self._next_token_loss(h, targets_T, has_target, count, target_rows is not None)

        logits = None
        if return_logits:
            logits_TV = self.language_model.logits(h)
            if scatter_back is None:
                logits = logits_TV.view(*input_ids.shape, -1)
            else:
                logits = logits_TV.new_zeros(*input_ids.shape, logits_TV.shape[-1])
                logits[scatter_back] = logits_TV
        return NVLMOutput(logits=logits, loss=loss, num_label_tokens=count)

    def _next_token_loss(self, h: torch.Tensor, targets_T: torch.Tensor, has_target: torch.Tensor,
                         count: int, at_targets_only: bool) -> torch.Tensor:
        """Mean cross-entropy over the `count` positions with a target; h holds every position
        (T, D), or with at_targets_only those positions alone, in order."""
        if count == 0:
            # Keep the graph connected so every rank of a data-parallel run calls backward.
            return h.sum() * 0.0
        # Only positions with a target go through the output projection.
        logits = self.language_model.logits(h if at_targets_only else h[has_target])
        return F.cross_entropy(logits.float(), targets_T[has_target])


def _packed_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   cu_seqlens: torch.Tensor | None, position_ids: torch.Tensor | None,
                   max_seqlen: int | None):
    """Flatten the model's inputs to packed ids (T,) and their PackedLayout.

    Returns (ids_T, layout, scatter_back): scatter_back is the boolean mask of the kept positions
    of (B, L) when padding was dropped, else None (the output keeps input_ids' shape as is).
    """
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids: expected an int32/int64 tensor, got {input_ids.dtype}")
    device = input_ids.device
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise InputError("attention_mask: packed inputs (cu_seqlens given) have no padding; "
                             "pass one or the other")
        if input_ids.ndim == 2 and input_ids.shape[0] != 1:
            raise InputError(f"input_ids: packed inputs are (T,) or (1, T), got {tuple(input_ids.shape)}")
        ids_T = input_ids.reshape(-1)
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1:
            raise TypeError(f"cu_seqlens: expected a 1-D int32 tensor, got {cu_seqlens.dtype} "
                            f"of shape {tuple(cu_seqlens.shape)}")
        lengths = cu_seqlens.diff()
        if position_ids is None:
            _, position_ids = sample_positions(cu_seqlens, ids_T.numel())
        elif position_ids.reshape(-1).shape != ids_T.shape:
            raise InputError(f"position_ids: expected {ids_T.numel()} positions, got "
                             f"{tuple(position_ids.shape)}")
        if max_seqlen is None:
            max_seqlen = int(lengths.max()) if len(lengths) else 0
        return ids_T, PackedLayout(cu_seqlens, position_ids.reshape(-1), max_seqlen), None

    if input_ids.ndim != 2:
        raise InputError(f"input_ids: expected (batch, length) rows, or packed (T,) with cu_seqlens; "
                         f"got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if attention_mask is None:
        if position_ids is not None:
            raise InputError("position_ids: only taken with packed inputs (cu_seqlens); rows "
                             "count positions from 0")
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
        positions = torch.arange(length, device=device).repeat(batch)
        return input_ids.reshape(-1), PackedLayout(cu, positions, length), None

    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask: expected input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    # Padding must sit before or after the tokens of a row, never between them.
    first = torch.where(keep.any(dim=1), keep.int().argmax(dim=1), 0)
    span = torch.arange(length, device=device)[None, :]
    contiguous = (keep == ((span >= first[:, None]) & (span < (first + lengths)[:, None])))
    if not bool(contiguous.all()):
        raise InputError("attention_mask: each row's tokens must be contiguous (left or right "
                         "padding only)")
    positions = (keep.cumsum(dim=1) - 1)[keep]
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return input_ids[keep], PackedLayout(cu, positions, int(lengths.max())), keep

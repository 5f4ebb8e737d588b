"""Compile-gate specs of ops/multimodal_embed.py: the assembly and its two gradients, per dtype."""

from __future__ import annotations

from ..ops.multimodal_embed import (_CHUNK, _MAX_BLOCK_D, _image_grad_kernel,
                                    _multimodal_embed_fwd_kernel, _table_grad_kernel,
                                    _table_grad_merge_kernel)
from .spec import KernelSpec, signature


def _specs(dtype: str) -> list[KernelSpec]:
    block = {"BLOCK_D": _MAX_BLOCK_D}
    # ids, counts and row strides are int64: tables and token counts may pass 2^31 elements
    wide = {name: "i64" for name in ("table_row_stride", "images_row_stride", "vocab",
                                     "num_images", "image_token_id")}
    return [
        KernelSpec(f"multimodal_embed_fwd[{dtype}]", _multimodal_embed_fwd_kernel,
                   signature(_multimodal_embed_fwd_kernel, dtype, ids_ptr="*i64",
                             image_index_ptr="*i32", **wide), block,
                   divisible_by_16=("table_ptr", "images_ptr", "out_ptr", "table_row_stride",
                                    "images_row_stride", "dim"), expects_16_byte_access=True),
        KernelSpec(f"multimodal_embed_image_grad[{dtype}]", _image_grad_kernel,
                   signature(_image_grad_kernel, dtype, positions_ptr="*i64"), block,
                   divisible_by_16=("grad_ptr", "grad_images_ptr", "dim"),
                   expects_16_byte_access=True),
        KernelSpec(f"multimodal_embed_table_grad[{dtype}]", _table_grad_kernel,
                   signature(_table_grad_kernel, dtype, sorted_keys_ptr="*i64", order_ptr="*i64",
                             partials_ptr="*fp32", num_tokens="i64", vocab="i64"),
                   {**block, "CHUNK": _CHUNK},
                   divisible_by_16=("grad_ptr", "grad_table_ptr", "partials_ptr", "dim"),
                   expects_16_byte_access=True),
        KernelSpec(f"multimodal_embed_table_grad_merge[{dtype}]", _table_grad_merge_kernel,
                   signature(_table_grad_merge_kernel, dtype, sorted_keys_ptr="*i64",
                             partials_ptr="*fp32", num_tokens="i64", vocab="i64"),
                   {**block, "CHUNK": _CHUNK},
                   divisible_by_16=("grad_table_ptr", "partials_ptr", "dim"),
                   expects_16_byte_access=True),
    ]


def specs() -> list[KernelSpec]:
    return [spec for dtype in ("bf16", "fp16", "fp32") for spec in _specs(dtype)]

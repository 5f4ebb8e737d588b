"""Fake (shape-only) implementations and autograd wiring shared by the compiled backends.

The native ops (`torch.ops.nvlm_kernels.*`, defined in C++) and the Triton ops
(`torch.ops.nvlm_triton.*`, custom ops in nvlm_kernels/ops) take the same arguments, so each op's
fake implementation and backward formula is written once here and registered for both.
"""

from __future__ import annotations

import torch


def refuse_double_backward(op: str) -> None:
    """Called from a backward: with create_graph=True the gradient of a backward op without a
    derivative would silently be zero, so say so instead."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"{op}: double backward (create_graph=True) is not supported by "
                                  f"the native and triton kernels; use the torch backend")


def _register_fake(op, fn) -> None:
    torch.library.register_fake(op)(fn)


# --------------------------------------------------------------------------------------------
# pixel_shuffle(x, scale, grid_h, grid_w) -> out
# pixel_unshuffle(grad_out, channels, scale, grid_h, grid_w) -> grad_x   (the inverse permutation)


def _shuffle_fake(x, scale, grid_h, grid_w):
    tokens = (grid_h // scale) * (grid_w // scale)
    return x.new_empty((x.shape[0], tokens, x.shape[2] * scale * scale))


def _unshuffle_fake(grad_out, channels, scale, grid_h, grid_w):
    return grad_out.new_empty((grad_out.shape[0], grid_h * grid_w, channels))


def register_pixel_shuffle(shuffle_op, unshuffle_op) -> None:
    """Each permutation's adjoint is the other, so gradients of any order are exact."""
    def shuffle_setup_context(ctx, inputs, output):
        x, scale, grid_h, grid_w = inputs
        ctx.geometry = (x.shape[2], scale, grid_h, grid_w)

    def shuffle_backward(ctx, grad_out):
        return unshuffle_op(grad_out, *ctx.geometry), None, None, None

    def unshuffle_setup_context(ctx, inputs, output):
        _grad_out, _channels, scale, grid_h, grid_w = inputs
        ctx.geometry = (scale, grid_h, grid_w)

    def unshuffle_backward(ctx, grad_grad_x):
        return shuffle_op(grad_grad_x, *ctx.geometry), None, None, None, None

    _register_fake(shuffle_op, _shuffle_fake)
    _register_fake(unshuffle_op, _unshuffle_fake)
    torch.library.register_autograd(shuffle_op, shuffle_backward, setup_context=shuffle_setup_context)
    torch.library.register_autograd(unshuffle_op, unshuffle_backward,
                                    setup_context=unshuffle_setup_context)


# --------------------------------------------------------------------------------------------
# pixel_shuffle_layernorm(x, weight, bias, eps, scale, grid_h, grid_w) -> (out, mean, rstd)
# pixel_shuffle_layernorm_backward(grad_out, x, weight, mean, rstd, scale, grid_h, grid_w)
#     -> (grad_x, grad_weight, grad_bias)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _psln_fake(x, weight, bias, eps, scale, grid_h, grid_w):
    rows = (grid_h // scale) * (grid_w // scale)
    out = x.new_empty((x.shape[0], rows, x.shape[2] * scale * scale))
    stats = x.new_empty((x.shape[0], rows), dtype=_stats_dtype(x.dtype))
    return out, stats, torch.empty_like(stats)


def _psln_backward_fake(grad_out, x, weight, mean, rstd, scale, grid_h, grid_w):
    # new_empty(shape), not empty_like: the real ops return contiguous tensors whatever the
    # inputs' strides, and torch.compile checks the fake's strides against them
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def register_pixel_shuffle_layernorm(forward_op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        x, weight, _bias, _eps, scale, grid_h, grid_w = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.geometry = (scale, grid_h, grid_w)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        refuse_double_backward("pixel_shuffle_layernorm")
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(grad_out, x, weight, mean, rstd,
                                                     *ctx.geometry)
        return grad_x, grad_weight, grad_bias, None, None, None, None

    _register_fake(forward_op, _psln_fake)
    _register_fake(backward_op, _psln_backward_fake)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------
# multimodal_embed(input_ids, embed_weight, image_embeds, image_token_id) -> out
# multimodal_embed_backward(grad_out, input_ids, vocab, num_images, image_token_id)
#     -> (grad_embed_weight, grad_image_embeds); vocab = 0 (num_images = 0) skips the table (image)
#     gradient, e.g. for a frozen embedding table: no (V, D) allocation, no sort.


def _embed_fake(input_ids, embed_weight, image_embeds, image_token_id):
    return embed_weight.new_empty((*input_ids.shape, embed_weight.shape[1]))


def _embed_backward_fake(grad_out, input_ids, vocab, num_images, image_token_id):
    dim = grad_out.shape[-1]
    return grad_out.new_empty((vocab, dim)), grad_out.new_empty((num_images, dim))


def register_multimodal_embed(forward_op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        input_ids, embed_weight, image_embeds, image_token_id = inputs
        ctx.save_for_backward(input_ids)
        ctx.sizes = (embed_weight.shape[0], image_embeds.shape[0], image_token_id)

    def backward(ctx, grad_out):
        (input_ids,) = ctx.saved_tensors
        vocab, num_images, image_token_id = ctx.sizes
        need_table, need_images = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_table, grad_images = backward_op(grad_out.contiguous(), input_ids,
                                              vocab if need_table else 0,
                                              num_images if need_images else 0, image_token_id)
        return None, grad_table if need_table else None, grad_images if need_images else None, None

    def backward_setup_context(ctx, inputs, output):
        grad_out, input_ids, vocab, num_images, image_token_id = inputs
        ctx.save_for_backward(input_ids)
        ctx.image_token_id = image_token_id
        ctx.shape = (vocab, num_images, grad_out.shape[-1], grad_out.dtype)

    def backward_backward(ctx, grad_grad_table, grad_grad_images):
        # The backward is linear in grad_out and is the adjoint of the forward, so its own
        # backward is the forward applied to the incoming gradients: double backward is exact.
        (input_ids,) = ctx.saved_tensors
        vocab, num_images, dim, dtype = ctx.shape
        if grad_grad_table is None:
            grad_grad_table = input_ids.new_zeros((vocab, dim), dtype=dtype)
        if grad_grad_images is None:
            grad_grad_images = input_ids.new_zeros((num_images, dim), dtype=dtype)
        grad_grad_out = forward_op(input_ids, grad_grad_table, grad_grad_images,
                                   ctx.image_token_id)
        return grad_grad_out, None, None, None, None

    _register_fake(forward_op, _embed_fake)
    _register_fake(backward_op, _embed_backward_fake)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, backward_backward,
                                    setup_context=backward_setup_context)


# --------------------------------------------------------------------------------------------
# varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
#                  softmax_scale, causal) -> (out, lse)        lse: (Hq, total_q) fp32
# varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
#                           max_seqlen_q, max_seqlen_k, softmax_scale, causal) -> (dq, dk, dv)


def _attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, causal):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), lse


def _attention_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_varlen_attention(forward_op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.scalars = scalars  # max_seqlen_q, max_seqlen_k, softmax_scale, causal
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        refuse_double_backward("varlen_attention")
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 *ctx.scalars)
        return dq, dk, dv, None, None, None, None, None, None

    _register_fake(forward_op, _attention_fake)
    _register_fake(backward_op, _attention_backward_fake)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------
# cross_attention(q, k, v, kv_start, kv_end, gate_factor, softmax_scale, save_ungated)
#     -> (out, lse, ungated)      gate_factor: None or (Hq,) fp32 tanh(gate); ungated: the output
#                                 before the gate when save_ungated, else empty
# cross_attention_backward(grad_out, q, k, v, out, lse, ungated, kv_start, kv_end, gate_factor,
#                          softmax_scale, gate_grad) -> (dq, dk, dv, d_gate_factor)


def _cross_attention_fake(q, k, v, kv_start, kv_end, gate_factor, softmax_scale, save_ungated):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    saved = save_ungated and gate_factor is not None
    return q.new_empty(q.shape), lse, q.new_empty(q.shape if saved else (0,))


def _cross_attention_backward_fake(grad_out, q, k, v, out, lse, ungated, kv_start, kv_end,
                                   gate_factor, softmax_scale, gate_grad):
    gate_shape = (q.shape[1],) if gate_grad and gate_factor is not None else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(gate_shape, dtype=torch.float32))


def register_cross_attention(forward_op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        q, k, v, kv_start, kv_end, gate_factor, softmax_scale, _save_ungated = inputs
        out, lse, ungated = output
        ctx.save_for_backward(q, k, v, out, lse, ungated, kv_start, kv_end, gate_factor)
        ctx.softmax_scale = softmax_scale
        ctx.mark_non_differentiable(lse, ungated)

    def backward(ctx, grad_out, _grad_lse, _grad_ungated):
        refuse_double_backward("cross_attention")
        q, k, v, out, lse, ungated, kv_start, kv_end, gate_factor = ctx.saved_tensors
        gate_grad = ctx.needs_input_grad[5]
        if gate_grad and ungated.shape != q.shape:
            raise RuntimeError("cross_attention: the gate needs a gradient but the forward was "
                               "run with save_ungated=False; pass save_ungated=True whenever "
                               "gate_factor requires grad")
        dq, dk, dv, d_gate = backward_op(grad_out, q, k, v, out, lse, ungated, kv_start, kv_end,
                                         gate_factor, ctx.softmax_scale, gate_grad)
        return dq, dk, dv, None, None, (d_gate if gate_grad else None), None, None

    _register_fake(forward_op, _cross_attention_fake)
    _register_fake(backward_op, _cross_attention_backward_fake)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)

"""Per-channel batch statistics: mean and biased variance over the batch and spatial dims.

A dense block computes them once per channel, when the channel is written, and every later layer's
norm1 reuses them: a channel's data never changes after it is written.  The same holds for instance
norm's per-sample statistics (``instance_stats``).
"""

import functools

import torch

from . import _triton as _tr
from ._autograd import Autograd
from ._primitive import Op
from .layout import acc_dtype, broadcast


def channel_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of x [N, C, *spatial] (x may be a channel slice), in the
    accumulation dtype."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=0)
    dtype = acc_dtype(x.dtype)
    return mean.to(dtype), var.to(dtype)


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance [N, C] per sample and channel of x [N, C, *spatial]: instance norm's, in the
    accumulation dtype.  One torch reduction over the spatial dims, on every device (no kernel of ours)."""
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=list(range(2, x.dim())), correction=0)
    return mean, var


# ---------------------------------------------------------------------------------------------------
# Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).  Statistics are computed where the data is
# produced: ``_stats_pass_kernel`` optionally copies its input to ``y`` (the block writes a layer's new
# channels into its buffer this way, with the dropout mask applied) and reduces per-chunk (mean, M2)
# partials with Chan's formula; ``finalize_stats_kernel`` merges the chunks of each channel into mean and
# biased variance.  Shifting by each tile's own mean keeps fp32 accurate for any offset.  Two launches,
# no glue op, deterministic (no atomics).


if _tr.TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_pass_kernel(
        x_ptr, y_ptr, m_ptr, part_ptr, drop_scale,
        C, Q, chunk, D, H, W,
        sxn, sxc, sxd, sxh, sxw,
        syn, syc, syd, syh, syw,
        smn, smc, smd, smh, smw,
        STORE: tl.constexpr, DROP: tl.constexpr, STATS: tl.constexpr,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        """Programs own BLOCK_C channels and one chunk of pixels: y = x (* mask * drop_scale), and the
        (mean, M2) of the values y holds (rounded to y's dtype) into part[chunk, 0/1, C]."""
        pid_s = tl.program_id(1)
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        channels = offs_c.to(tl.int64)[:, None]
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        count = tl.zeros([BLOCK_C], dtype=ACC)
        q_start = pid_s * chunk
        q_end = tl.minimum(q_start + chunk, Q)
        for q0 in range(q_start, q_end, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            n, d, h, w = _tr.pixel_coords(offs_q, D, H, W)
            mask = mask_c[:, None] & (offs_q < q_end)[None, :]
            x = tl.load(x_ptr + channels * sxc + (n * sxn + d * sxd + h * sxh + w * sxw)[None, :], mask=mask, other=0.0)
            if DROP:
                keep = tl.load(m_ptr + channels * smc + (n * smn + d * smd + h * smh + w * smw)[None, :], mask=mask, other=0)
                x = (x.to(ACC) * keep.to(ACC) * drop_scale).to(y_ptr.dtype.element_ty)
            if STORE:
                y = x.to(y_ptr.dtype.element_ty)
                tl.store(y_ptr + channels * syc + (n * syn + d * syd + h * syh + w * syw)[None, :], y, mask=mask)
                x = y
            if STATS:
                count, mean, m2 = _tr.tile_stats(x.to(ACC), mask, count, mean, m2, ACC)
        if STATS:
            tl.store(part_ptr + (2 * pid_s) * C + offs_c, mean, mask=mask_c)
            tl.store(part_ptr + (2 * pid_s + 1) * C + offs_c, m2, mask=mask_c)

    @triton.jit
    def finalize_stats_kernel(
        part_ptr, mean_ptr, var_ptr, C, Q, splits, chunk,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """mean and biased variance of each channel from the (mean, M2) partials of ``splits`` chunks of
        ``chunk`` pixels (the last ones shorter or empty) in part[splits, 0/1, C]: BLOCK_S chunks at a time are
        merged with each other, then into the running (count, mean, M2), both by Chan's formula."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        count = tl.zeros([BLOCK_C], dtype=ACC)
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        for s0 in range(0, splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < splits)[:, None] & mask_c[None, :]
            counts = tl.where(mask, tl.maximum(tl.minimum(chunk, Q - offs_s * chunk), 0).to(ACC)[:, None], 0.0)
            means = tl.load(part_ptr + (2 * offs_s)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            m2s = tl.load(part_ptr + (2 * offs_s + 1)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            block_count = tl.sum(counts, axis=0)
            block_mean = tl.sum(counts * means, axis=0) / tl.maximum(block_count, 1.0)
            delta = tl.where(mask, means - block_mean[None, :], 0.0)
            block_m2 = tl.sum(m2s + counts * delta * delta, axis=0)
            total = count + block_count
            share = block_count / tl.maximum(total, 1.0)
            step = block_mean - mean
            mean += step * share
            m2 += block_m2 + step * step * count * share
            count = total
        tl.store(mean_ptr + offs_c, mean.to(mean_ptr.dtype.element_ty), mask=mask_c)
        tl.store(var_ptr + offs_c, (m2 / Q).to(var_ptr.dtype.element_ty), mask=mask_c)


_STATS_CONFIG = {"gpu": {"BLOCK_C": 32, "BLOCK_Q": 128, "num_warps": 8}, "interpreter": {"BLOCK_C": 64, "BLOCK_Q": 64}}
_FINALIZE_CONFIG = {"gpu": {"BLOCK_C": 32, "BLOCK_S": 64, "num_warps": 4}, "interpreter": {"BLOCK_C": 64, "BLOCK_S": 64}}


def finalize_stats(part: torch.Tensor, splits: int, q: int, chunk: int, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write mean and var [C] (contiguous) from the first ``splits`` partials of part [>= splits, 2, C], chunks of
    ``chunk`` pixels (of q in all)."""
    c = part.size(2)
    config = _tr.pick_config(_FINALIZE_CONFIG["gpu"], _FINALIZE_CONFIG["interpreter"])
    grid = (_tr.cdiv(c, config["BLOCK_C"]),)
    _tr.launch(finalize_stats_kernel, grid, (part, mean, var), (c, q, splits, chunk), part.device,
               acc=_tr.acc_type(part.dtype), **config)  # fmt: skip


def stats_pass(x: torch.Tensor, y=None, keep=None, drop_scale: float = 1.0, stats=None) -> None:
    """One pass over x [N, C, *spatial]: copy it into ``y`` (same shape, any strides) when given, times
    ``keep * drop_scale`` when a dropout mask is given (``keep`` broadcastable as x: [N, C, 1, 1] drops
    whole channels), and write its channels' mean and biased variance into ``stats`` = (mean, var) when
    given.  The caller checked that the Triton kernels take x (``runs_triton`` and ``common_geometry``)."""
    plan = _stats_plan(x.shape, x.stride(), None if y is None else y.stride(), None if keep is None else keep.stride(), x.device)
    (c, q, chunk), splits, scalars = plan
    part = torch.empty((splits, 2, c), dtype=acc_dtype(x.dtype), device=x.device) if stats is not None else x
    tensors = (x, x if y is None else y, x if keep is None else keep, part)
    config = _tr.pick_config(_STATS_CONFIG["gpu"], _STATS_CONFIG["interpreter"])
    _tr.launch(_stats_pass_kernel, (_tr.cdiv(c, config["BLOCK_C"]), splits), tensors, (drop_scale, *scalars), x.device,
               STORE=y is not None, DROP=keep is not None, STATS=stats is not None, acc=_tr.acc_type(x.dtype), **config)  # fmt: skip
    if stats is not None:
        finalize_stats(part, splits, q, chunk, *stats)


@functools.lru_cache(maxsize=4096)
def _stats_plan(shape, x_strides, y_strides, m_strides, device):
    """((C, pixels, chunk), splits, the kernel's integer arguments) of ``stats_pass`` for one geometry."""
    views = [torch.empty_strided(shape, s, device="meta") for s in (x_strides, y_strides, m_strides) if s is not None]
    (d, h, w), found = _tr.common_geometry(*views)
    c, q = shape[1], shape[0] * d * h * w
    config = _tr.pick_config(_STATS_CONFIG["gpu"], _STATS_CONFIG["interpreter"])
    splits, chunk = _tr.num_splits(_tr.cdiv(c, config["BLOCK_C"]), q, config["BLOCK_Q"], device)
    found = iter(found)
    geometry = [(s[0], s[1], *next(found)) if s is not None else (0,) * 5 for s in (x_strides, y_strides, m_strides)]
    return (c, q, chunk), splits, (c, q, chunk, d, h, w, *geometry[0], *geometry[1], *geometry[2])


def channel_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """channel_stats with the Triton kernels (empty inputs and more than 3 spatial dims use the reference)."""
    if not _tr.runs_triton(x) or _tr.common_geometry(x) is None:
        return channel_stats_reference(x)
    acc = acc_dtype(x.dtype)
    mean, var = x.new_empty(x.size(1), dtype=acc), x.new_empty(x.size(1), dtype=acc)
    stats_pass(x, stats=(mean, var))
    return mean, var


# ---------------------------------------------------------------------------------------------------
# The custom op.  Its backward is a formula (no kernel): d mean / dx = 1 / count, d var / dx =
# 2 (x - mean) / count.


def _fake(x):
    dtype = acc_dtype(x.dtype)
    return x.new_empty(x.size(1), dtype=dtype), x.new_empty(x.size(1), dtype=dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    count = x.numel() // x.size(1)
    centered = x.to(mean.dtype) - broadcast(mean, x)
    grad = broadcast(grad_mean / count, x) + 2 * centered * broadcast(grad_var / count, x)
    return grad.to(x.dtype)


channel_stats = Op(
    "channel_stats", "channel_stats", channel_stats_reference, _fake, triton=channel_stats_triton,
    autograd=Autograd(_backward, _setup_context),
).custom_op  # fmt: skip

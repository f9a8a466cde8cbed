"""Per-channel batch statistics: mean and biased variance over the batch and spatial dims.

A dense block computes them once per channel, when the channel is written, and every later layer's
norm1 reuses them: a channel's data never changes after it is written.  The same holds for instance
norm's per-sample statistics (``instance_stats``).
"""

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
# Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).  Each program owns BLOCK_C channels and
# one chunk of pixels; it merges per-tile (mean, M2) pairs with Chan's formula, and torch merges the
# chunks' partials in float64.  Shifting by each tile's own mean keeps fp32 accurate for any offset.


if _tr.TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _channel_stats_kernel(
        x_ptr, part_ptr,
        C, Q, chunk, D, H, W,
        sxn, sxc, sxd, sxh, sxw,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        splits = tl.num_programs(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        rows = x_ptr + offs_c.to(tl.int64)[:, None] * sxc
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        count = tl.zeros([BLOCK_C], dtype=ACC)
        q_start = pid_s * chunk
        q_end = tl.minimum(q_start + chunk, Q)
        for q0 in range(q_start, q_end, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask_q = offs_q < q_end
            n, d, h, w = _tr.pixel_coords(offs_q, D, H, W)
            mask = mask_c[:, None] & mask_q[None, :]
            x = tl.load(rows + (n * sxn + d * sxd + h * sxh + w * sxw)[None, :], mask=mask, other=0.0).to(ACC)
            tile_count = tl.minimum(q_end - q0, BLOCK_Q).to(ACC)
            tile_mean = tl.sum(x, axis=1) / tile_count
            centered = tl.where(mask, x - tile_mean[:, None], 0.0)
            tile_m2 = tl.sum(centered * centered, axis=1)
            total = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / total)
            m2 += tile_m2 + delta * delta * (count * (tile_count / total))
            count = total
        tl.store(part_ptr + pid_s * C + offs_c, mean, mask=mask_c)
        tl.store(part_ptr + (splits + pid_s) * C + offs_c, m2, mask=mask_c)


_STATS_CONFIG = {"gpu": {"BLOCK_C": 32, "BLOCK_Q": 128, "num_warps": 8}, "interpreter": {"BLOCK_C": 64, "BLOCK_Q": 64}}


def channel_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """channel_stats with a Triton kernel (empty inputs and more than 3 spatial dims use the reference)."""
    found = _tr.common_geometry(x)
    if not _tr.runs_triton(x) or found is None:
        return channel_stats_reference(x)
    (d, h, w), (strides,) = found
    c, q = x.size(1), x.size(0) * d * h * w
    config = _tr.pick_config(_STATS_CONFIG["gpu"], _STATS_CONFIG["interpreter"])
    c_blocks = triton.cdiv(c, config["BLOCK_C"])
    splits, chunk = _tr.num_splits(c_blocks, q, config["BLOCK_Q"], x.device)
    acc = acc_dtype(x.dtype)
    part = torch.empty((2, splits, c), dtype=acc, device=x.device)
    with _tr.device_guard(x):
        _channel_stats_kernel[(c_blocks, splits)](
            x, part, c, q, chunk, d, h, w, x.stride(0), x.stride(1), *strides, ACC=_tr.acc_type(x.dtype), **config
        )
    counts = (torch.arange(1, splits + 1, device=x.device) * chunk).clamp(max=q) - torch.arange(splits, device=x.device) * chunk
    counts = counts.to(torch.float64)[:, None]
    chunk_mean, chunk_m2 = part.to(torch.float64).unbind(0)
    mean = (counts * chunk_mean).sum(0) / q
    var = (chunk_m2.sum(0) + (counts * (chunk_mean - mean) ** 2).sum(0)) / q
    return mean.to(acc), var.to(acc)


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

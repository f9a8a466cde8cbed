"""BatchNorm (given statistics) followed by ReLU, and its backward: the BN2 -> ReLU before each 3x3 conv.

``training=True`` means mean/invstd are the batch statistics of x itself, so the backward includes the
gradient that flows through them (the train-mode BatchNorm formula); otherwise they are constants
(running statistics, the eval-mode formula).
"""

import functools

import torch
from torch import Tensor

from . import _triton as _tr
from ._autograd import bn_autograd
from ._primitive import Op
from ._math import batch_norm_backward, bn_relu_math, normalize
from .layout import acc_dtype, broadcast, empty_like_layout


def bn_relu_reference(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """relu(gamma * (x - mean) * invstd + beta) per channel, in x's dtype and layout."""
    return bn_relu_math(x, mean, invstd, gamma, beta)


def bn_relu_backward_reference(
    grad_z: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_gamma, grad_beta) of bn_relu, with the ReLU mask recomputed from x."""
    x_hat = normalize(x, mean, invstd)
    active = x_hat * broadcast(gamma, x) + broadcast(beta, x) > 0
    grad_y = grad_z.to(mean.dtype) * active
    grad_x, grad_gamma, grad_beta = batch_norm_backward(grad_y, x_hat, invstd, gamma, training)
    return grad_x.to(x.dtype), grad_gamma, grad_beta


# ---------------------------------------------------------------------------------------------------
# Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).  The kernels take ``_tr.NormArgs`` and fold
# BN into z = x * scale + shift per channel tile.  Backward is one pass in eval mode; in training a REDUCE
# pass writes per-chunk partial sums (sum dA, sum dA * x_hat) into [splits, 2, C] and the APPLY pass sums
# them itself (``bn_backward_terms``), so no op runs between the two launches.


if _tr.TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _bn_relu_kernel(
        x_ptr, y_ptr, mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo,
        C, Q, D, H, W,
        sxn, sxc, sxd, sxh, sxw,
        syn, syc, syd, syh, syw,
        VAR: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & (offs_q < Q)[None, :]
        n, d, h, w = _tr.pixel_coords(offs_q, D, H, W)
        channels = offs_c.to(tl.int64)[:, None]
        _, _, scale, shift = _tr.load_norm(mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo, offs_c, mask_c, VAR, ACC)
        x = tl.load(x_ptr + channels * sxc + (n * sxn + d * sxd + h * sxh + w * sxw)[None, :], mask=mask, other=0.0)
        y = tl.maximum(x.to(ACC) * scale[:, None] + shift[:, None], 0.0)
        y_ptrs = y_ptr + channels * syc + (n * syn + d * syd + h * syh + w * syw)[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bn_relu_backward_kernel(
        gz_ptr, x_ptr, mean_ptr, v_ptr, gamma_ptr, beta_ptr, gx_ptr, sums_ptr, grad_gamma_ptr, grad_beta_ptr, eps_hi, eps_lo,
        C, Q, chunk, D, H, W, count,
        szn, szc, szd, szh, szw,
        sxn, sxc, sxd, sxh, sxw,
        sgn, sgc, sgd, sgh, sgw,
        REDUCE: tl.constexpr, APPLY: tl.constexpr, TRAINING: tl.constexpr, VAR: tl.constexpr,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        splits = tl.num_programs(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        channels = offs_c.to(tl.int64)[:, None]
        mean, invstd, scale, shift = _tr.load_norm(mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo, offs_c, mask_c, VAR, ACC)
        mean, invstd, scale, shift = mean[:, None], invstd[:, None], scale[:, None], shift[:, None]
        if TRAINING:
            c1, c2 = _tr.bn_backward_terms(sums_ptr, grad_gamma_ptr, grad_beta_ptr, offs_c, mask_c, C, splits, count, pid_s,
                                       ACC, BLOCK_C, BLOCK_S)  # fmt: skip
        sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
        sum_dy_xhat = tl.zeros([BLOCK_C], dtype=ACC)
        q_start = pid_s * chunk
        q_end = tl.minimum(q_start + chunk, Q)
        for q0 in range(q_start, q_end, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask = mask_c[:, None] & (offs_q < q_end)[None, :]
            n, d, h, w = _tr.pixel_coords(offs_q, D, H, W)
            x = tl.load(x_ptr + channels * sxc + (n * sxn + d * sxd + h * sxh + w * sxw)[None, :], mask=mask, other=0.0)
            x = x.to(ACC)
            gz = tl.load(gz_ptr + channels * szc + (n * szn + d * szd + h * szh + w * szw)[None, :], mask=mask, other=0.0)
            da = tl.where(mask & (x * scale + shift > 0.0), gz.to(ACC), 0.0)
            x_hat = (x - mean) * invstd
            if REDUCE:
                sum_dy += tl.sum(da, axis=1)
                sum_dy_xhat += tl.sum(da * x_hat, axis=1)
            if APPLY:
                if TRAINING:
                    gx = scale * (da - c1 - x_hat * c2)
                else:
                    gx = scale * da
                g_ptrs = gx_ptr + channels * sgc + (n * sgn + d * sgd + h * sgh + w * sgw)[None, :]
                tl.store(g_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            tl.store(sums_ptr + (2 * pid_s) * C + offs_c, sum_dy, mask=mask_c)
            tl.store(sums_ptr + (2 * pid_s + 1) * C + offs_c, sum_dy_xhat, mask=mask_c)


_ELEMENTWISE_CONFIG = {"gpu": {"BLOCK_C": 32, "BLOCK_Q": 128, "num_warps": 8}, "interpreter": {"BLOCK_C": 64, "BLOCK_Q": 64}}
_BACKWARD_CONFIG = {"gpu": {"BLOCK_C": 32, "BLOCK_Q": 128, "BLOCK_S": 32, "num_warps": 8},
                    "interpreter": {"BLOCK_C": 64, "BLOCK_Q": 64, "BLOCK_S": 64}}  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _backward_plan(shape, z_strides, x_strides, g_strides, device):
    """(grid, the kernel's integer arguments) of ``_bn_relu_backward_kernel`` for one geometry."""
    views = (torch.empty_strided(shape, s, device="meta") for s in (z_strides, x_strides, g_strides))
    (d, h, w), (sz, sx, sg) = _tr.common_geometry(*views)
    c, q = shape[1], shape[0] * d * h * w
    config = _tr.pick_config(_BACKWARD_CONFIG["gpu"], _BACKWARD_CONFIG["interpreter"])
    c_blocks = _tr.cdiv(c, config["BLOCK_C"])
    splits, chunk = _tr.num_splits(c_blocks, q, config["BLOCK_Q"], device)
    strides = (*z_strides[:2], *sz, *x_strides[:2], *sx, *g_strides[:2], *sg)
    return (c_blocks, splits), (c, q, chunk, d, h, w, q, *strides)


def bn_relu_triton(x, mean, invstd, gamma, beta):
    """bn_relu with a Triton kernel (empty inputs and more than 3 spatial dims use the reference)."""
    if not _tr.runs_triton(x) or _tr.common_geometry(x) is None:
        return bn_relu_reference(x, mean, invstd, gamma, beta)
    return bn_relu_launch(x, _tr.NormArgs.of(mean, invstd, gamma, beta))


def bn_relu_launch(x, norm: "_tr.NormArgs"):
    """relu(bn(x)), in x's layout, with the Triton kernel."""
    out = empty_like_layout(x, x.size(1))
    grid, scalars = _elementwise_plan(x.shape, x.stride(), out.stride(), x.device)
    norm_tensors, eps, var = norm.kernel_args()
    config = _tr.pick_config(_ELEMENTWISE_CONFIG["gpu"], _ELEMENTWISE_CONFIG["interpreter"])
    _tr.launch(_bn_relu_kernel, grid, (x, out, *norm_tensors), (*eps, *scalars), x.device, VAR=var,
               acc=_tr.acc_type(x.dtype), **config)  # fmt: skip
    return out


@functools.lru_cache(maxsize=4096)
def _elementwise_plan(shape, x_strides, y_strides, device):
    """(grid, the kernel's integer arguments) of ``_bn_relu_kernel`` for one geometry."""
    (d, h, w), (sx, sy) = _tr.common_geometry(*(torch.empty_strided(shape, s, device="meta") for s in (x_strides, y_strides)))
    c, q = shape[1], shape[0] * d * h * w
    config = _tr.pick_config(_ELEMENTWISE_CONFIG["gpu"], _ELEMENTWISE_CONFIG["interpreter"])
    grid = (_tr.cdiv(q, config["BLOCK_Q"]), _tr.cdiv(c, config["BLOCK_C"]))
    return grid, (c, q, d, h, w, *x_strides[:2], *sx, *y_strides[:2], *sy)


def bn_relu_backward_triton(grad_z, x, mean, invstd, gamma, beta, training):
    """bn_relu_backward with Triton kernels: (grad_x, grad_gamma, grad_beta)."""
    if not _tr.runs_triton(x) or _tr.common_geometry(grad_z, x) is None:
        return bn_relu_backward_reference(grad_z, x, mean, invstd, gamma, beta, training)
    return bn_relu_backward_launch(grad_z, x, _tr.NormArgs.of(mean, invstd, gamma, beta), training)


def bn_relu_backward_launch(grad_z, x, norm: "_tr.NormArgs", training: bool):
    """(grad_x in x's layout, grad_gamma, grad_beta) of relu(bn(x)) with the Triton kernels."""
    grad_x = empty_like_layout(x, x.size(1))
    grid, scalars = _backward_plan(x.shape, grad_z.stride(), x.stride(), grad_x.stride(), x.device)
    norm_tensors, eps, var = norm.kernel_args()
    config = _tr.pick_config(_BACKWARD_CONFIG["gpu"], _BACKWARD_CONFIG["interpreter"])
    sums = torch.empty((grid[1], 2, x.size(1)), dtype=acc_dtype(x.dtype), device=x.device)

    def launch(reduce, apply, train, grad_gamma, grad_beta):
        tensors = (grad_z, x, *norm_tensors, grad_x, sums, grad_gamma, grad_beta)
        _tr.launch(_bn_relu_backward_kernel, grid, tensors, (*eps, *scalars), x.device, REDUCE=reduce, APPLY=apply,
                   TRAINING=train, VAR=var, acc=_tr.acc_type(x.dtype), **config)  # fmt: skip

    grad_gamma, grad_beta = _tr.batch_norm_backward_passes(launch, sums, training)
    return grad_x, grad_gamma, grad_beta


# ---------------------------------------------------------------------------------------------------
# The custom ops.


def _fake(x, mean, invstd, gamma, beta):
    return empty_like_layout(x, x.size(1))


def _fake_backward(grad_z, x, mean, invstd, gamma, beta, training):
    return empty_like_layout(x, x.size(1)), torch.empty_like(gamma), torch.empty_like(beta)


bn_relu_backward = Op(
    "bn_relu", "bn_relu_backward", bn_relu_backward_reference, _fake_backward, triton=bn_relu_backward_triton
).custom_op
bn_relu = Op(
    "bn_relu", "bn_relu", bn_relu_reference, _fake, triton=bn_relu_triton,
    autograd=bn_autograd(bn_relu_reference, bn_relu_backward),
).custom_op  # fmt: skip

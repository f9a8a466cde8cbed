"""Launcher helpers shared by the Triton kernels of the primitives (the kernels live in each primitive's
file; the 1x1-conv kernels two primitives share live in ``_conv1x1_triton``).

Nothing here imports triton, so the package imports where triton is absent.

Conventions of every kernel:

* A tensor [N, C, *spatial] is addressed as [N, C, D, H, W] through its own strides (``geometry``), so
  a channel prefix ``buf[:, :C]`` of an NCHW or channels-last buffer is read and written in place.
* Per-channel vectors (mean, invstd, gamma, beta) and every accumulator use the accumulation dtype
  (``ACC``): float64 for float64 input (fp64 dots, DMMA on sm80+), float32 for float32, float16 and
  bfloat16.  Empty tensors and more than 3 spatial dims that cannot be merged run the reference.
* Offsets are int64: channel indices and pixel coordinates (``pixel_coords``) are cast before they meet
  a stride, so a tensor may span more than 2^31 elements; flat pixel indices stay int32 (at most
  ``MAX_PIXELS`` pixels, else the reference runs).
* Reductions over pixels are split in ``num_splits`` chunks whose partial results land in a small
  [splits, ...] tensor summed by torch afterwards: deterministic, no atomics.
* fp32 GEMMs use IEEE fp32 unless ``DENSENET_FUSED_TF32=1`` (``config.tf32``, read at every launch)
  selects TF32.
"""

import contextlib
import functools
import math

import torch

from ._backend import TF32_ENV, TRITON_AVAILABLE, config

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_PIXELS = 2**30  # pixel indices are int32 in the kernels; the margin keeps tile and chunk ends in range

__all__ = [
    "MAX_PIXELS",
    "TF32_ENV",
    "TRITON_AVAILABLE",
    "TRITON_DTYPES",
    "acc_type",
    "autotune_configs",
    "batch_norm_backward_passes",
    "device_guard",
    "common_geometry",
    "folded_affine",
    "geometry",
    "input_precision",
    "interpreting",
    "num_splits",
    "pick_config",
    "runs_triton",
]


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return config.interpret


def autotune_configs(gpu_configs: list, interpreter_config) -> list:
    """The autotuning space: exactly one config under the interpreter (autotuning needs a GPU driver)."""
    return [interpreter_config] if interpreting() else gpu_configs


def pick_config(gpu_config: dict, interpreter_config: dict) -> dict:
    """Block sizes (and num_warps/num_stages) of a kernel launched without autotuning."""
    return dict(interpreter_config) if interpreting() else dict(gpu_config)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: IEEE fp32 by default (matches the reference), TF32 on request."""
    if dtype == torch.float32 and config.tf32:
        return "tf32"
    return "ieee"


def acc_type(dtype: torch.dtype):
    """The Triton accumulation dtype (``ACC`` constexpr) for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def folded_affine(mean, invstd, gamma, beta, dtype):
    """(scale, shift) with gamma * (x - mean) * invstd + beta == x * scale + shift, contiguous ``dtype``."""
    scale = (gamma * invstd).to(dtype).contiguous()
    shift = (beta - mean * (gamma * invstd)).to(dtype).contiguous()
    return scale, shift


def batch_norm_backward_passes(launch, sums: torch.Tensor, scale: torch.Tensor, count: int, training: bool):
    """Run a BatchNorm-backward kernel's passes; return (grad_gamma, grad_beta).

    ``launch(c1, c2, reduce, apply, train)`` runs the kernel, whose REDUCE pass writes the per-channel
    partial sums (sum dA, sum dA * x_hat) into ``sums`` [2, splits, C] and whose APPLY pass writes grad_x.
    Eval mode needs no sums to write grad_x, so one pass does both; training reduces first and then
    applies with c1 = mean(dA), c2 = mean(dA * x_hat) over the ``count`` pixels.
    """
    if training:
        launch(scale, scale, True, False, False)
        grad_beta, grad_gamma = sums[0].sum(0), sums[1].sum(0)  # separate tensors: custom-op outputs may not alias
        launch(grad_beta / count, grad_gamma / count, False, True, True)
    else:
        launch(scale, scale, True, True, False)
        grad_beta, grad_gamma = sums[0].sum(0), sums[1].sum(0)
    return grad_gamma, grad_beta


def runs_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors (else the launcher runs the reference).

    At most ``MAX_PIXELS`` pixels (N * D * H * W): the kernels index pixels, and the ends of their tiles
    and chunks, in int32.
    """
    return all(t.dtype in TRITON_DTYPES and 0 < t.numel() <= MAX_PIXELS * t.size(1) for t in tensors)


def geometry(t: torch.Tensor, merge: bool = True):
    """([D, H, W], [sd, sh, sw]) addressing t's spatial dims, or None when more than 3 are needed.

    With ``merge``, spatial dims that are contiguous with each other are merged and size-1 dims
    dropped (fewer index computations, any rank of a dense or channel-sliced tensor fits); without it
    (pooling needs the real dims) the dims are only left-padded to 3.
    """
    dims = list(zip(t.shape[2:], t.stride()[2:]))
    if merge:
        merged = []
        for size, stride in dims:
            if size == 1:
                continue
            if merged and merged[-1][1] == stride * size:
                merged[-1] = (merged[-1][0] * size, stride)
            else:
                merged.append((size, stride))
        dims = merged
    if len(dims) > 3:
        return None
    dims = [(1, 0)] * (3 - len(dims)) + dims
    return [size for size, _ in dims], [stride for _, stride in dims]


def common_geometry(*tensors: torch.Tensor):
    """One [D, H, W] for tensors of the same spatial shape, with each one's strides; None if impossible.

    Returns (sizes, [strides of each tensor]).  Merged dims when every tensor merges the same way.
    """
    for merge in (True, False):
        found = [geometry(t, merge) for t in tensors]
        if all(g is not None for g in found) and all(g[0] == found[0][0] for g in found):
            return found[0][0], [g[1] for g in found]
    return None


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(
    other_programs: int, pixels: int, block: int, device: torch.device, max_splits: int | None = None
) -> tuple[int, int]:
    """(splits, chunk): cut ``pixels`` into chunks (multiples of ``block``) so the grid fills the GPU.

    ``other_programs`` is the grid size over the non-reduced dims.  Aim at 4 programs per SM; each
    chunk holds at least one block.  Under the interpreter aim at 4 programs in all.
    """
    if device.type == "cuda":
        target = 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    blocks = math.ceil(pixels / block)
    splits = max(1, min(blocks, math.ceil(target / max(other_programs, 1)), max_splits or blocks))
    chunk = math.ceil(blocks / splits) * block
    return math.ceil(pixels / chunk), chunk


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


if TRITON_AVAILABLE:

    @triton.jit
    def load_bn_columns(mean_ptr, invstd_ptr, scale_ptr, shift_ptr, offs_c, mask_c):
        """Per-channel mean, invstd, scale and shift at offs_c as [BLOCK_C, 1] columns (0 where masked)."""
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        return mean, invstd, scale, shift

    @triton.jit
    def pixel_coords(q, D, H, W):
        """Split flat int32 pixel indices q over [N, D, H, W] into (n, d, h, w), cast to int64: a
        coordinate times its stride can pass 2^31 when both fit in int32 (Triton passes strides below
        2^31 as int32).  The divisions stay int32, which is cheaper."""
        w = q % W
        t = q // W
        h = t % H
        t = t // H
        d = t % D
        n = t // D
        return n.to(tl.int64), d.to(tl.int64), h.to(tl.int64), w.to(tl.int64)

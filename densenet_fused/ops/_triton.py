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
* Normalization arguments (``NormArgs``) are per-channel mean, a second vector and gamma, beta: the second
  is invstd, or (``VAR``) the biased variance with eps, and the kernel forms invstd = rsqrt(var + eps).
  The block passes its statistics or the running ones this way, so no glue op forms invstd or folds
  the affine: each kernel folds scale = gamma * invstd, shift = beta - mean * scale per channel tile.
* The 1x1 convolutions' fp32 GEMMs follow torch's convolution precision (``input_precision``), as
  torchvision's cuDNN convolutions do: TF32 where ``torch.backends.cudnn.conv.fp32_precision`` (or the
  older ``allow_tf32`` it mirrors) allows it, IEEE fp32 otherwise.
"""

import contextlib
import functools
import math

import torch

from ._backend import TRITON_AVAILABLE, config
from ._norm_args import NormArgs

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_PIXELS = 2**30  # pixel indices are int32 in the kernels; the margin keeps tile and chunk ends in range

__all__ = [
    "MAX_PIXELS",
    "NormArgs",
    "TRITON_AVAILABLE",
    "TRITON_DTYPES",
    "acc_type",
    "autotune_configs",
    "cdiv",
    "batch_norm_backward_passes",
    "device_guard",
    "common_geometry",
    "geometry",
    "input_precision",
    "interpreting",
    "multiprocessors",
    "next_power_of_2",
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
    """Block sizes (and num_warps/num_stages) of a kernel launched without autotuning (not to be modified)."""
    return interpreter_config if config.interpret else gpu_config


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (``triton.cdiv`` is a constexpr function, slow to call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for host code."""
    return 1 << max(n - 1, 0).bit_length()


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision of a 1x1 convolution: TF32 for float32 where torch lets cuDNN convolutions use it,
    IEEE otherwise.  torch's flags: ``torch.backends.cudnn.conv.fp32_precision``, where "none" defers to
    ``cudnn.fp32_precision`` and then ``torch.backends.fp32_precision`` ("none" throughout: IEEE; the legacy
    ``allow_tf32 = False`` sets that); a torch without them has only ``cudnn.allow_tf32``."""
    if dtype != torch.float32:
        return "ieee"
    if not hasattr(torch.backends.cudnn, "conv"):
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    for level in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
        if level.fp32_precision != "none":
            return level.fp32_precision
    return "ieee"


def acc_type(dtype: torch.dtype):
    """The Triton accumulation dtype (``ACC`` constexpr) for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


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
    (pooling needs the real dims) the dims are only left-padded to 3.  Cached per shape and strides.
    """
    return _geometry(t.shape[2:], t.stride()[2:], merge)


@functools.lru_cache(maxsize=4096)
def _geometry(shape: tuple, strides: tuple, merge: bool):
    dims = list(zip(shape, strides))
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
    return tuple(size for size, _ in dims), tuple(stride for _, stride in dims)


def common_geometry(*tensors: torch.Tensor):
    """One [D, H, W] for tensors of the same spatial shape, with each one's strides; None if impossible.

    Returns (sizes, [strides of each tensor]).  Merged dims when every tensor merges the same way.
    """
    for merge in (True, False):
        found = [geometry(t, merge) for t in tensors]
        if all(g is not None for g in found) and all(g[0] == found[0][0] for g in found):
            return found[0][0], [g[1] for g in found]
    return None


def multiprocessors(device: torch.device) -> int:
    """The number of SMs of a CUDA device."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


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
        target = 4 * multiprocessors(device)
    else:
        target = 4
    blocks = math.ceil(pixels / block)
    splits = max(1, min(blocks, math.ceil(target / max(other_programs, 1)), max_splits or blocks))
    chunk = math.ceil(blocks / splits) * block
    return math.ceil(pixels / chunk), chunk


def batch_norm_backward_passes(launch, sums: torch.Tensor, training: bool):
    """Run a BatchNorm-backward kernel's passes; return (grad_gamma, grad_beta).

    ``launch(reduce, apply, train, grad_gamma, grad_beta)`` runs the kernel, whose REDUCE pass writes the
    per-chunk partial sums (sum dA, sum dA * x_hat) into ``sums`` [splits, 2, C] and whose APPLY pass writes
    grad_x.  Training reduces first, then applies, summing the partials in the kernel (which also stores
    grad_gamma and grad_beta); eval mode needs no sums for grad_x, so one pass does both and torch sums them.
    """
    if training:
        grad_gamma, grad_beta = sums.new_empty(sums.size(2)), sums.new_empty(sums.size(2))
        launch(True, False, False, grad_gamma, grad_beta)
        launch(False, True, True, grad_gamma, grad_beta)
        return grad_gamma, grad_beta
    launch(True, True, False, sums, sums)
    return sums[:, 1].sum(0), sums[:, 0].sum(0)  # separate tensors: custom-op outputs may not alias


# Compiled launches, keyed by everything Triton specializes a kernel on: (kernel, constexprs, and per argument
# the number itself or a tensor's dtype and 16-byte alignment; floats are not specialized, so keying on their
# values only adds entries).  Value: (the compiled kernel, its
# grid, the values of the parameters after the call's arguments), or None where the handle cannot be used.
_COMPILED: dict = {}
_MAX_COMPILED = 2**16


def launch(kernel, grid, tensors: tuple, scalars: tuple, device: torch.device, acc, **constexprs) -> dict:
    """``kernel[grid](*tensors, *scalars, ACC=acc, **constexprs)`` on ``device`` (the kernel takes its tensors
    first; ``acc``, the accumulation dtype, follows from theirs); returns the constexprs it ran with, the
    autotuned ones (BLOCK sizes) included.

    Triton's own launcher binds ~30 arguments, computes the specialization key and looks the kernel up on
    every call (tens of microseconds of host time).  A launch whose specialization was seen before (same
    integers, dtypes, pointer alignment and constexprs: exactly what Triton keys its compiled kernels on)
    goes straight to the compiled kernel's launcher, with the grid and autotuned config found the first time,
    the way Triton itself calls it.  The first launch (which compiles and autotunes, so never inside a CUDA
    graph capture), the interpreter, another current device, and Triton's launch hooks installed before a
    specialization's first launch (profilers: then its launches stay Triton's) use ``kernel[grid]``.
    """
    index = device.index
    if device.type != "cuda" or index != torch.cuda.current_device():
        with device_guard(device):
            kernel[grid](*tensors, *scalars, ACC=acc, **constexprs)
        return {**constexprs, **_best_config(kernel)}
    key = (kernel, *constexprs.values(), *scalars, *[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])
    entry = _COMPILED.get(key)
    if entry is None:  # the first launch of this specialization: Triton's launcher compiles and autotunes
        compiled = kernel[grid](*tensors, *scalars, ACC=acc, **constexprs)
        meta = {**constexprs, "ACC": acc, **_best_config(kernel)}
        if len(_COMPILED) >= _MAX_COMPILED:  # many input shapes: start over rather than grow without bound
            _COMPILED.clear()
        _COMPILED[key] = _compiled_entry(kernel, compiled, grid, len(tensors) + len(scalars), meta)
        return meta
    compiled, size, tail, meta = entry
    if compiled is None:
        kernel[grid](*tensors, *scalars, ACC=acc, **constexprs)
        return meta
    stream = torch._C._cuda_getCurrentRawStream(index)
    compiled.run(size[0], size[1], size[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *tensors, *scalars, *tail)  # fmt: skip
    return meta


def _best_config(kernel) -> dict:
    config = getattr(kernel, "best_config", None)
    return dict(config.kwargs) if config is not None else {}


def _compiled_entry(kernel, compiled, grid, given: int, meta) -> tuple:
    """(compiled kernel, grid, values of the parameters after the ``given`` positional ones, meta), the
    compiled kernel None where its launcher cannot be called directly."""
    names = getattr(kernel, "arg_names", None)  # a JITFunction's or an Autotuner's
    usable = all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")) and not _launch_hooks()
    if not usable or names is None or any(name not in meta for name in names[given:]):
        return None, None, None, meta
    size = grid(meta) if callable(grid) else grid
    size = (*size, 1, 1)[:3]
    return compiled, size, tuple(meta[name] for name in names[given:]), meta


def _launch_hooks() -> bool:
    """Whether a Triton launch hook is installed (profilers): then launches go through Triton, which calls it."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    hooks = [getattr(runtime, name, None) for name in ("launch_enter_hook", "launch_exit_hook")]
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def device_guard(device: torch.device):
    """Launch on ``device`` (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


if TRITON_AVAILABLE:

    @triton.jit
    def load_norm(mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo, offs_c, mask_c, VAR: tl.constexpr, ACC: tl.constexpr):
        """Per-channel (mean, invstd, scale, shift) at offs_c in ACC (0 where masked), from ``NormArgs``:
        invstd = v, or rsqrt(v + eps) with ``VAR``; scale = gamma * invstd, shift = beta - mean * scale."""
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        if VAR:
            invstd = tl.where(mask_c, tl.rsqrt((v + eps_hi) + eps_lo), 0.0)  # exact float32 parts: float64-exact eps
        else:
            invstd = v
        scale = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(ACC) * invstd
        shift = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(ACC) - mean * scale
        return mean, invstd, scale, shift

    @triton.jit
    def tile_stats(v, mask, count, mean, m2, ACC: tl.constexpr):
        """Merge the masked [BLOCK_C, BLOCK_Q] tile ``v`` into per-row running (count, mean, M2)."""
        tile_count = tl.sum(mask.to(ACC), axis=1)
        tile_mean = tl.sum(tl.where(mask, v, 0.0), axis=1) / tl.maximum(tile_count, 1.0)
        centered = tl.where(mask, v - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centered * centered, axis=1)
        total = count + tile_count
        share = tile_count / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        return total, mean + delta * share, m2 + tile_m2 + delta * delta * count * share

    @triton.jit
    def bn_backward_terms(sums_ptr, grad_gamma_ptr, grad_beta_ptr, offs_c, mask_c, C, splits, count, pid_s,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """Sum the REDUCE pass's partials sums[splits, 0/1, C] for offs_c; program 0 of the chunks stores them
        as grad_beta and grad_gamma.  Returns the training formula's mean(dA) and mean(dA * x_hat) columns."""
        sum_da = tl.zeros([BLOCK_C], dtype=ACC)
        sum_da_xhat = tl.zeros([BLOCK_C], dtype=ACC)
        for s0 in range(0, splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < splits)[:, None] & mask_c[None, :]
            rows = sums_ptr + (2 * offs_s)[:, None] * C + offs_c[None, :]
            sum_da += tl.sum(tl.load(rows, mask=mask, other=0.0), axis=0)
            sum_da_xhat += tl.sum(tl.load(rows + C, mask=mask, other=0.0), axis=0)
        if pid_s == 0:
            tl.store(grad_beta_ptr + offs_c, sum_da, mask=mask_c)
            tl.store(grad_gamma_ptr + offs_c, sum_da_xhat, mask=mask_c)
        return (sum_da / count)[:, None], (sum_da_xhat / count)[:, None]

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

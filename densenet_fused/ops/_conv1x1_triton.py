"""The 1x1-conv Triton kernels shared by bn_relu_conv1x1 and the pooled transition (bn_relu_pool_conv1x1).

CUDA tensors; CPU tensors under TRITON_INTERPRET=1.  Three kernels, with the averaging window
PD x PH x PW a constexpr (1x1x1 for the dense layer's conv, 2 per spatial dim for the transition):

* forward GEMM   Y[:, q] = W @ Z[:, q], Z = avgpool(relu(x * scale + shift)) computed per loaded tile
                 (re-masked after the ReLU: relu(shift) is not 0 in masked rows), fp32 accumulation
                 (fp64 for fp64 inputs); optionally the batch statistics of Y in its epilogue;
* weight grad    dW = sum_q dY[:, q] Z[:, q]^T, split-K over the N*H*W pixels into [splits, B, C]
                 partials summed by torch (deterministic);
* input grad     dA = (W^T dY) * (z > 0) with the ReLU mask recomputed from the buffer; REDUCE forms
                 sum dA and sum dA * x_hat per channel (= grad_beta, grad_gamma), APPLY writes
                 gamma * invstd * (dA - mean(dA) - x_hat * mean(dA * x_hat)) (training) or
                 gamma * invstd * dA (eval), added in place into grad_buffer[:, :C] (ACCUMULATE) or
                 stored.  Training runs REDUCE then APPLY (dA is recomputed, K = B is small, so no
                 scratch at all; APPLY sums the REDUCE partials itself); eval runs both in one pass.  When pooling, it also visits the
                 row/column the floor cuts off (odd sizes) so grad_x is written everywhere (in training
                 those pixels still get the BatchNorm mean terms).

fp32 inputs use TF32 or IEEE fp32 dots as torch's convolution precision says (``_tr.input_precision``);
fp16/bf16 tiles feed the tensor cores directly (Z is rounded to the input dtype before the dot, as the
reference rounds its activation).  The weight may stay float32 under autocast: tiles are cast as loaded.
"""

import functools
import math
from typing import NamedTuple

import torch

from . import _triton as _tr
from .channel_stats import finalize_stats
from .layout import acc_dtype

if _tr.TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Autotuning spaces for A100 (sm80, 164 KiB smem) and H100 (sm90, 228 KiB), in three families:
    #   "mma":   fp16/bf16 (and fp32 under TF32) on the tensor cores;
    #   "fma32": IEEE fp32, which Triton computes with FMAs holding a whole BLOCK_K slice of both operands
    #            in registers: only BLOCK_K = 16 stays out of register spills;
    #   "fp64":  float64 (DMMA on sm80+), twice the registers and shared memory of fp32.
    # Every config was compiled for sm80 and sm90 with Triton's own argument specialization, NCHW and
    # channels-last, pooled and not (ptxas resource usage); ``pool=False`` marks those that spill
    # registers when each Z element averages a 2x2 window (the transition), so pooled launches skip them.

    def _family(named_args, kwargs) -> str:
        dtype = named_args["x_ptr"].dtype
        if dtype == torch.float64:
            return "fp64"
        if dtype == torch.float32 and kwargs.get("PREC", named_args.get("PREC")) == "ieee":
            return "fma32"
        return "mma"

    def _pooling(named_args, kwargs) -> bool:
        return kwargs.get("PW", named_args.get("PW", 1)) > 1

    def _prune(configs, named_args, kwargs, widths):
        """Configs of the launch's family; pooled-safe ones when pooling; no block wider than needed."""
        family, pooling = _family(named_args, kwargs), _pooling(named_args, kwargs)
        mine = [c for c in configs if _CONFIG_TAGS.get(id(c), ("", True))[0] == family]
        usable = [c for c in mine if _CONFIG_TAGS[id(c)][1] or not pooling]
        kept = [c for c in usable if all(c.kwargs[name] <= max(32, _tr.next_power_of_2(size)) for name, size in widths.items())]
        if not kept:  # e.g. B below every BLOCK_B of the family: the narrowest, then the smallest tile
            kept = sorted(usable, key=lambda c: [*(c.kwargs[name] for name in widths), math.prod(c.kwargs.values()) * c.num_stages])[:1]
        return kept or configs[:1]

    def _prune_forward(configs, named_args, **kwargs):
        return _prune(configs, named_args, kwargs, {"BLOCK_B": named_args["B"]})

    def _prune_weight_grad(configs, named_args, **kwargs):
        return _prune(configs, named_args, kwargs, {"BLOCK_B": named_args["B"], "BLOCK_C": named_args["C"]})

    _CONFIG_TAGS = {}  # id(config) -> (family, usable when pooled)

    def _tagged(names, rows):
        configs = []
        for family, pool_ok, *blocks, warps, stages in rows:
            config = triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)
            _CONFIG_TAGS[id(config)] = (family, pool_ok)
            configs.append(config)
        return configs

    # M = B (bn_size * k, usually 128 or 192), N = pixels, K = C.
    _FORWARD_GPU_CONFIGS = _tagged(
        ("BLOCK_B", "BLOCK_Q", "BLOCK_K"),
        [
            ("mma", True, 128, 128, 32, 8, 3),
            ("mma", False, 128, 128, 64, 8, 3),
            ("mma", True, 128, 64, 32, 4, 4),
            ("mma", False, 64, 128, 32, 4, 4),
            ("mma", True, 64, 64, 64, 4, 3),
            ("mma", False, 128, 256, 32, 8, 3),
            ("mma", True, 64, 256, 32, 8, 3),
            ("mma", True, 64, 64, 32, 4, 2),
            ("fma32", True, 64, 128, 16, 8, 2),
            ("fma32", True, 128, 64, 16, 8, 2),
            ("fma32", True, 64, 64, 16, 8, 2),
            ("fma32", True, 32, 128, 16, 4, 2),
            ("fma32", True, 32, 64, 16, 4, 2),
            ("fp64", True, 64, 64, 16, 8, 2),
            ("fp64", True, 32, 64, 16, 4, 2),
        ],
    )
    _FORWARD_CONFIGS = _tr.autotune_configs(
        _FORWARD_GPU_CONFIGS, triton.Config({"BLOCK_B": 32, "BLOCK_Q": 64, "BLOCK_K": 32})
    )

    # M = B, N = C, K = pixels split in chunks of 128 (_WEIGHT_GRAD_ALIGN), which every BLOCK_Q divides.
    _WEIGHT_GRAD_GPU_CONFIGS = _tagged(
        ("BLOCK_B", "BLOCK_C", "BLOCK_Q"),
        [
            ("mma", True, 128, 128, 32, 8, 3),
            ("mma", False, 128, 128, 64, 8, 3),
            ("mma", False, 128, 64, 32, 4, 3),
            ("mma", False, 64, 128, 32, 4, 3),
            ("mma", True, 64, 64, 64, 4, 3),
            ("mma", True, 64, 64, 32, 4, 4),
            ("mma", False, 32, 64, 64, 4, 3),
            ("fma32", True, 64, 64, 16, 8, 2),
            ("fma32", True, 32, 64, 16, 4, 2),
            ("fma32", False, 64, 128, 16, 8, 2),
            ("fma32", False, 128, 64, 16, 8, 2),
            ("fma32", False, 64, 64, 32, 8, 2),
            ("fp64", True, 64, 64, 16, 8, 2),
            ("fp64", True, 32, 64, 16, 4, 2),
        ],
    )
    _WEIGHT_GRAD_CONFIGS = _tr.autotune_configs(
        _WEIGHT_GRAD_GPU_CONFIGS, triton.Config({"BLOCK_B": 32, "BLOCK_C": 64, "BLOCK_Q": 64})
    )

    @triton.jit
    def _bn_relu_pool_tile(
        x_ptr, offs_c, mask_c, sxc, base, mask_q, sxd, sxh, sxw, scale, shift,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        """[BLOCK_C, BLOCK_Q] ACC tile of relu(x * scale + shift) averaged over PDxPHxPW windows at
        int64 pixel offsets ``base``; exactly 0 outside the masks (relu(shift) is not).  Each window tap
        is added to ``base`` in int64 (sxd + sxh + sxw can pass 2^31 in int32)."""
        mask = mask_c[:, None] & mask_q[None, :]
        rows = x_ptr + offs_c.to(tl.int64)[:, None] * sxc
        z = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
        for i in tl.static_range(PD):
            for j in tl.static_range(PH):
                for k in tl.static_range(PW):
                    x = tl.load(rows + (base + i * sxd + j * sxh + k * sxw)[None, :], mask=mask, other=0.0)
                    z += tl.maximum(x.to(ACC) * scale[:, None] + shift[:, None], 0.0)
        if PD * PH * PW > 1:
            z = z * (1.0 / (PD * PH * PW))
        return tl.where(mask, z, 0.0)

    @triton.autotune(
        configs=_FORWARD_CONFIGS,
        key=["C_KEY", "B", "Q_KEY", "LAYOUT_KEY", "PW", "PREC", "STATS"],
        prune_configs_by={"early_config_prune": _prune_forward},
    )
    @triton.jit
    def _conv1x1_forward_kernel(
        x_ptr, mean_ptr, v_ptr, gamma_ptr, beta_ptr, w_ptr, y_ptr, part_ptr, eps_hi, eps_lo,
        C, B, Q, C_KEY, Q_KEY, LAYOUT_KEY, OD, OH, OW,
        sxn, sxc, sxd, sxh, sxw,
        swb, swc,
        syn, syb, syd, syh, syw,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
        VAR: tl.constexpr, STATS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Program (i, j) computes output channels j * BLOCK_B.. for its share of the pixel tiles (the grid
        caps the programs along pixels, ``forward_programs``); with STATS it also reduces the (mean, M2) of its
        outputs, as stored (rounded to y's dtype), into part[i, 0/1, B]: the next norm's batch statistics."""
        pid_q = tl.program_id(0)
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        tiles = tl.cdiv(Q, BLOCK_Q)
        per = tl.cdiv(tiles, tl.num_programs(0))
        q_start = pid_q * per * BLOCK_Q
        q_end = tl.minimum(q_start + per * BLOCK_Q, Q)
        count = tl.zeros([BLOCK_B], dtype=ACC)
        mean = tl.zeros([BLOCK_B], dtype=ACC)
        m2 = tl.zeros([BLOCK_B], dtype=ACC)
        for q0 in range(q_start, q_end, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask_q = offs_q < q_end
            n, od, oh, ow = _tr.pixel_coords(offs_q, OD, OH, OW)
            x_base = n * sxn + (od * PD) * sxd + (oh * PH) * sxh + (ow * PW) * sxw
            acc = tl.zeros([BLOCK_B, BLOCK_Q], dtype=ACC)
            for k0 in range(0, C, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < C
                _, _, scale, shift = _tr.load_norm(mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo, offs_k, mask_k, VAR, ACC)
                z = _bn_relu_pool_tile(
                    x_ptr, offs_k, mask_k, sxc, x_base, mask_q, sxd, sxh, sxw, scale, shift, PD, PH, PW, ACC, BLOCK_K, BLOCK_Q
                )
                w_mask = mask_b[:, None] & mask_k[None, :]
                w = tl.load(w_ptr + offs_b[:, None] * swb + offs_k[None, :] * swc, mask=w_mask, other=0.0)
                w = w.to(x_ptr.dtype.element_ty)
                acc = tl.dot(w, z.to(w.dtype), acc, input_precision=PREC)
            y = acc.to(y_ptr.dtype.element_ty)
            mask = mask_b[:, None] & mask_q[None, :]
            y_ptrs = y_ptr + offs_b.to(tl.int64)[:, None] * syb + (n * syn + od * syd + oh * syh + ow * syw)[None, :]
            tl.store(y_ptrs, y, mask=mask)
            if STATS:
                count, mean, m2 = _tr.tile_stats(y.to(ACC), mask, count, mean, m2, ACC)
        if STATS:
            tl.store(part_ptr + (2 * pid_q) * B + offs_b, mean, mask=mask_b)
            tl.store(part_ptr + (2 * pid_q + 1) * B + offs_b, m2, mask=mask_b)

    @triton.autotune(
        configs=_WEIGHT_GRAD_CONFIGS,
        key=["C_KEY", "B", "Q_KEY", "LAYOUT_KEY", "PW", "PREC"],
        prune_configs_by={"early_config_prune": _prune_weight_grad},
    )
    @triton.jit
    def _conv1x1_weight_grad_kernel(
        dy_ptr, x_ptr, mean_ptr, v_ptr, gamma_ptr, beta_ptr, part_ptr, eps_hi, eps_lo,
        C, B, Q, chunk, C_KEY, Q_KEY, LAYOUT_KEY, OD, OH, OW,
        sdn, sdb, sdd, sdh, sdw,
        sxn, sxc, sxd, sxh, sxw,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
        VAR: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        pid_s = tl.program_id(2)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_b = offs_b < B
        mask_c = offs_c < C
        _, _, scale, shift = _tr.load_norm(mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo, offs_c, mask_c, VAR, ACC)
        dy_rows = dy_ptr + offs_b.to(tl.int64)[:, None] * sdb
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC)
        q_start = pid_s * chunk
        q_end = tl.minimum(q_start + chunk, Q)
        for q0 in range(q_start, q_end, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask_q = offs_q < q_end
            n, od, oh, ow = _tr.pixel_coords(offs_q, OD, OH, OW)
            dy_mask = mask_b[:, None] & mask_q[None, :]
            dy = tl.load(dy_rows + (n * sdn + od * sdd + oh * sdh + ow * sdw)[None, :], mask=dy_mask, other=0.0)
            x_base = n * sxn + (od * PD) * sxd + (oh * PH) * sxh + (ow * PW) * sxw
            z = _bn_relu_pool_tile(
                x_ptr, offs_c, mask_c, sxc, x_base, mask_q, sxd, sxh, sxw, scale, shift, PD, PH, PW, ACC, BLOCK_C, BLOCK_Q
            )
            acc = tl.dot(dy, tl.trans(z.to(dy.dtype)), acc, input_precision=PREC)
        part_ptrs = part_ptr + (pid_s * B + offs_b)[:, None].to(tl.int64) * C + offs_c[None, :]
        tl.store(part_ptrs, acc, mask=mask_b[:, None] & mask_c[None, :])

    @triton.jit
    def _conv1x1_input_grad_kernel(
        dy_ptr, w_ptr, x_ptr, mean_ptr, v_ptr, gamma_ptr, beta_ptr, gx_ptr, sums_ptr, grad_gamma_ptr, grad_beta_ptr,
        eps_hi, eps_lo,
        C, B, Q, chunk, D, H, W, OD, OH, OW, count,
        sdn, sdb, sdd, sdh, sdw,
        swb, swc,
        sxn, sxc, sxd, sxh, sxw,
        sgn, sgc, sgd, sgh, sgw,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        RD: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
        REDUCE: tl.constexpr, APPLY: tl.constexpr, TRAINING: tl.constexpr, ACCUMULATE: tl.constexpr,
        VAR: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """Programs own BLOCK_C channels and one chunk of (pooled) pixels.  Offsets i < PD (etc.) walk the
        pooling window; RD = PD + 1 adds the row the floor cuts off after the last window (its grad_x
        has no dA term but, in training, still the mean terms)."""
        pid_s = tl.program_id(1)
        splits = tl.num_programs(1)
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        channels = offs_c.to(tl.int64)[:, None]
        mean, invstd, scale, shift = _tr.load_norm(mean_ptr, v_ptr, gamma_ptr, beta_ptr, eps_hi, eps_lo, offs_c, mask_c, VAR, ACC)
        mean, invstd, scale, shift = mean[:, None], invstd[:, None], scale[:, None], shift[:, None]
        if TRAINING:
            c1, c2 = _tr.bn_backward_terms(sums_ptr, grad_gamma_ptr, grad_beta_ptr, offs_c, mask_c, C, splits, count, pid_s,
                                           ACC, BLOCK_C, BLOCK_S)  # fmt: skip
        sum_da = tl.zeros([BLOCK_C], dtype=ACC)
        sum_da_xhat = tl.zeros([BLOCK_C], dtype=ACC)
        q_start = pid_s * chunk
        q_end = tl.minimum(q_start + chunk, Q)
        for q0 in range(q_start, q_end, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask_q = offs_q < q_end
            n, od, oh, ow = _tr.pixel_coords(offs_q, OD, OH, OW)
            dy_base = n * sdn + od * sdd + oh * sdh + ow * sdw
            dz = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                mask_b = offs_b < B
                wt_mask = mask_c[:, None] & mask_b[None, :]
                wt = tl.load(w_ptr + offs_c[:, None] * swc + offs_b[None, :] * swb, mask=wt_mask, other=0.0)
                wt = wt.to(x_ptr.dtype.element_ty)
                dy_ptrs = dy_ptr + offs_b.to(tl.int64)[:, None] * sdb + dy_base[None, :]
                dy = tl.load(dy_ptrs, mask=mask_b[:, None] & mask_q[None, :], other=0.0)
                dz = tl.dot(wt, dy.to(wt.dtype), dz, input_precision=PREC)
            if PD * PH * PW > 1:
                dz = dz * (1.0 / (PD * PH * PW))
            for i in tl.static_range(RD):
                for j in tl.static_range(RH):
                    for k in tl.static_range(RW):
                        d = od * PD + i
                        h = oh * PH + j
                        w = ow * PW + k
                        valid = mask_q
                        if i >= PD:
                            valid = valid & (od == OD - 1) & (d < D)
                        if j >= PH:
                            valid = valid & (oh == OH - 1) & (h < H)
                        if k >= PW:
                            valid = valid & (ow == OW - 1) & (w < W)
                        mask = mask_c[:, None] & valid[None, :]
                        x_ptrs = x_ptr + channels * sxc + (n * sxn + d * sxd + h * sxh + w * sxw)[None, :]
                        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
                        x_hat = (x - mean) * invstd
                        if (i < PD) & (j < PH) & (k < PW):
                            da = tl.where(mask & (x * scale + shift > 0.0), dz, 0.0)
                            if REDUCE:
                                sum_da += tl.sum(da, axis=1)
                                sum_da_xhat += tl.sum(da * x_hat, axis=1)
                        else:
                            da = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
                        if APPLY:
                            if TRAINING:
                                gx = scale * (da - c1 - x_hat * c2)
                            else:
                                gx = scale * da
                            g_ptrs = gx_ptr + channels * sgc + (n * sgn + d * sgd + h * sgh + w * sgw)[None, :]
                            if ACCUMULATE:
                                gx += tl.load(g_ptrs, mask=mask, other=0.0).to(ACC)
                            tl.store(g_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            tl.store(sums_ptr + (2 * pid_s) * C + offs_c, sum_da, mask=mask_c)
            tl.store(sums_ptr + (2 * pid_s + 1) * C + offs_c, sum_da_xhat, mask=mask_c)


_WEIGHT_GRAD_ALIGN = {"gpu": 128, "interpreter": 64}
# Not autotuned: APPLY adds into grad_buffer in place, and rerunning it to time configs would add twice.
# The pooled variant visits up to 3x3 pixels per pooled pixel: a narrower tile on 8 warps.  IEEE fp32
# and fp64 dots hold whole K slices in registers: K = BLOCK_B = 16.  (Each one compiled for sm80/sm90
# without register spills.)
_INPUT_GRAD_CONFIG = {
    "mma": {"BLOCK_C": 64, "BLOCK_Q": 64, "BLOCK_B": 32, "BLOCK_S": 32, "num_warps": 4, "num_stages": 2},
    "mma_pool": {"BLOCK_C": 32, "BLOCK_Q": 64, "BLOCK_B": 32, "BLOCK_S": 32, "num_warps": 8, "num_stages": 2},
    "fma": {"BLOCK_C": 32, "BLOCK_Q": 64, "BLOCK_B": 16, "BLOCK_S": 32, "num_warps": 8, "num_stages": 2},
    "interpreter": {"BLOCK_C": 64, "BLOCK_Q": 64, "BLOCK_B": 32, "BLOCK_S": 64},
}
# The forward caps its programs along pixels at this many per SM (each loops over its share of tiles), so
# that the statistics partials stay few: one finalize program merges them per channel block.
_FORWARD_PROGRAMS_PER_SM = 2
_MIN_BLOCK_Q = 64  # the narrowest BLOCK_Q of the forward's configs


def _input_grad_config(dtype: torch.dtype, precision: str, pool: bool) -> dict:
    if _tr.interpreting():
        return _INPUT_GRAD_CONFIG["interpreter"]
    if dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee"):
        return _INPUT_GRAD_CONFIG["fma"]
    return _INPUT_GRAD_CONFIG["mma_pool" if pool else "mma"]


def _tune_keys(channel_stride: int, channels: int, pixels: int) -> tuple[int, int, int]:
    """Autotuning keys (unused by the kernels): C and pixels in powers of 2, so the 58 layer widths of
    a DenseNet-121 share a few tunings, and whether channels are contiguous (channels-last)."""
    return _tr.next_power_of_2(channels), _tr.next_power_of_2(pixels), int(channel_stride == 1)


def pool_window(dims: int, pool: bool) -> list:
    """The averaging window [PD, PH, PW] over the spatial dims of a ``dims``-D tensor, padded to 3: 2 per real
    dim when pooling."""
    rank = dims - 2
    return [1] * (3 - rank) + [2] * rank if pool else [1, 1, 1]


def forward_programs(q: int, block_q: int, device: torch.device) -> tuple[int, int]:
    """(programs, pixels each) along the pixels of a forward launch with tiles of ``block_q`` pixels."""
    tiles = _tr.cdiv(q, block_q)
    cap = _FORWARD_PROGRAMS_PER_SM * _tr.multiprocessors(device) if device.type == "cuda" else 4
    programs = min(tiles, cap)
    return programs, _tr.cdiv(tiles, programs) * block_q


def conv1x1_forward_triton(x, norm: "_tr.NormArgs", weight, out, pool: bool, stats=None):
    """out = weight @ [avgpool2x](relu(bn(x))); the caller allocated ``out`` [N, B, *out_spatial].  With
    ``stats`` = (mean, var), also write the batch statistics of ``out``'s channels there (the GEMM's
    epilogue reduces them, one small finalize merges them).  ``weight`` may be float32 under autocast."""
    q, cap, scalars = _forward_plan(x.shape, x.stride(), out.shape, out.stride(), weight.shape[:2], weight.stride()[:2], pool, x.device)
    b = weight.size(0)
    part = torch.empty((cap, 2, b), dtype=acc_dtype(x.dtype), device=x.device) if stats is not None else out
    norm_tensors, eps, var = norm.kernel_args()
    window = pool_window(x.dim(), pool)

    def grid(meta):
        return forward_programs(q, meta["BLOCK_Q"], x.device)[0], _tr.cdiv(b, meta["BLOCK_B"])

    meta = _tr.launch(
        _conv1x1_forward_kernel, grid, (x, *norm_tensors, weight, out, part), (*eps, *scalars), x.device,
        PD=window[0], PH=window[1], PW=window[2], PREC=_tr.input_precision(x.dtype), acc=_tr.acc_type(x.dtype),
        STATS=stats is not None, VAR=var,
    )  # fmt: skip
    if stats is not None:
        programs, chunk = forward_programs(q, meta["BLOCK_Q"], x.device)
        finalize_stats(part, programs, q, chunk, *stats)
    return out


@functools.lru_cache(maxsize=4096)
def _forward_plan(x_shape, x_strides, y_shape, y_strides, w_shape, w_strides, pool, device):
    """(output pixels, the most programs any config launches, the kernel's integer arguments) of a forward."""
    x, out = (torch.empty_strided(shape, s, device="meta") for shape, s in ((x_shape, x_strides), (y_shape, y_strides)))
    if pool:
        sx = _tr.geometry(x, merge=False)[1]
        (od, oh, ow), sy = _tr.geometry(out, merge=False)
    else:
        (od, oh, ow), (sx, sy) = _tr.common_geometry(x, out)
    c, b = x_shape[1], w_shape[0]
    q = x_shape[0] * od * oh * ow
    cap = forward_programs(q, _MIN_BLOCK_Q, device)[0]
    keys = _tune_keys(x_strides[1], c, q)
    return q, cap, (c, b, q, *keys, od, oh, ow, *x_strides[:2], *sx, *w_strides, *y_strides[:2], *sy)


def conv1x1_backward_triton(grad_y, x, norm: "_tr.NormArgs", weight, grad_x, training, pool: bool, accumulate):
    """(grad_weight, grad_gamma, grad_beta); grad_x (same layout rules as x) is added to or overwritten.

    Shared by bn_relu_conv1x1 (accumulate into the block's gradient buffer) and the pooled transition.
    """
    grad_y = grad_y.to(x.dtype)
    precision = _tr.input_precision(x.dtype)
    plan = _backward_plan(x.shape, x.stride(), grad_y.shape, grad_y.stride(), grad_x.stride(), weight.shape[:2],
                          weight.stride()[:2], pool, x.dtype, precision, x.device)  # fmt: skip
    acc = acc_dtype(x.dtype)
    norm_tensors, eps, var = norm.kernel_args()
    acc_type = _tr.acc_type(x.dtype)
    window = pool_window(x.dim(), pool)
    b, c = weight.size(0), x.size(1)
    part = torch.empty((plan.splits, b, c), dtype=acc, device=x.device)
    sums = torch.empty((plan.input_grid[1], 2, c), dtype=acc, device=x.device)
    config = _input_grad_config(x.dtype, precision, pool)

    def input_grad(reduce, apply, train, grad_gamma, grad_beta):
        extra = plan.odd if apply else (0, 0, 0)
        tensors = (grad_y, weight, x, *norm_tensors, grad_x, sums, grad_gamma, grad_beta)
        _tr.launch(
            _conv1x1_input_grad_kernel, plan.input_grid, tensors, (*eps, *plan.input_scalars), x.device,
            PD=window[0], PH=window[1], PW=window[2], RD=window[0] + extra[0], RH=window[1] + extra[1],
            RW=window[2] + extra[2], REDUCE=reduce, APPLY=apply, TRAINING=train, ACCUMULATE=accumulate, VAR=var,
            PREC=precision, acc=acc_type, **config,
        )  # fmt: skip

    def weight_grid(meta):
        return _tr.cdiv(b, meta["BLOCK_B"]), _tr.cdiv(c, meta["BLOCK_C"]), plan.splits

    _tr.launch(_conv1x1_weight_grad_kernel, weight_grid, (grad_y, x, *norm_tensors, part), (*eps, *plan.weight_scalars),
               x.device, PD=window[0], PH=window[1], PW=window[2], PREC=precision, acc=acc_type, VAR=var)  # fmt: skip
    grad_gamma, grad_beta = _tr.batch_norm_backward_passes(input_grad, sums, training)
    grad_weight = part[0] if plan.splits == 1 else part.sum(0)
    return grad_weight.to(weight.dtype), grad_gamma, grad_beta


class _BackwardPlan(NamedTuple):
    splits: int  # of the weight gradient's split-K
    weight_scalars: tuple
    input_grid: tuple
    input_scalars: tuple
    odd: tuple  # per spatial dim, 1 where pooling leaves a row the input gradient must still write


@functools.lru_cache(maxsize=4096)
def _backward_plan(x_shape, x_strides, y_shape, y_strides, g_strides, w_shape, w_strides, pool, dtype, precision, device):
    """The grids' splits and the kernels' integer arguments of a backward, for one geometry."""
    shapes = ((x_shape, x_strides), (y_shape, y_strides), (x_shape, g_strides))
    x, grad_y, grad_x = (torch.empty_strided(shape, s, device="meta") for shape, s in shapes)
    window = pool_window(len(x_shape), pool)
    if pool:
        (d, h, w), sx = _tr.geometry(x, merge=False)
        (od, oh, ow), sd = _tr.geometry(grad_y, merge=False)
        sg = _tr.geometry(grad_x, merge=False)[1]
    else:
        (d, h, w), (sx, sd, sg) = _tr.common_geometry(x, grad_y, grad_x)
        od, oh, ow = d, h, w
    n, c, b = x_shape[0], x_shape[1], w_shape[0]
    q_out, count = n * od * oh * ow, n * d * h * w
    x_args, dy_args = (*x_strides[:2], *sx), (*y_strides[:2], *sd)
    # grad_weight: split-K over the output pixels; the [splits, B, C] partials stay below the size of x
    max_splits = max(1, q_out * dtype.itemsize // (acc_dtype(dtype).itemsize * b))
    align = _WEIGHT_GRAD_ALIGN["interpreter" if _tr.interpreting() else "gpu"]
    splits, chunk = _tr.num_splits(_tr.cdiv(b, 64) * _tr.cdiv(c, 64), q_out, align, device, max_splits)
    weight_scalars = (c, b, q_out, chunk, *_tune_keys(x_strides[1], c, q_out), od, oh, ow, *dy_args, *x_args)
    # grad_x and the BatchNorm sums
    config = _input_grad_config(dtype, precision, pool)
    c_blocks = _tr.cdiv(c, config["BLOCK_C"])
    x_splits, x_chunk = _tr.num_splits(c_blocks, q_out, config["BLOCK_Q"], device)
    input_scalars = (c, b, q_out, x_chunk, d, h, w, od, oh, ow, count, *dy_args, *w_strides, *x_args, *g_strides[:2], *sg)
    odd = (0, 0, 0) if not pool else tuple(s % 2 if p == 2 else 0 for s, p in zip((d, h, w), window))
    return _BackwardPlan(splits, weight_scalars, (c_blocks, x_splits), input_scalars, odd)


def runs_conv1x1_triton(*tensors) -> bool:
    """Dtypes the kernels take, non-empty, at most 3 spatial dims (else the launchers run the reference)."""
    return _tr.runs_triton(*tensors) and all(_tr.geometry(t, merge=False) is not None for t in tensors)

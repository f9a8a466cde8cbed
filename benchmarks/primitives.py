"""The fused primitives at DenseNet shapes: where each reads in a DenseNet's buffers, its inputs there, and
the error of its Triton kernel against its pure-PyTorch reference."""

import inspect
from typing import NamedTuple

import torch

from densenet_fused.ops import PRIMITIVES
from densenet_fused.ops.layout import acc_dtype

from .models import Arch


class OpShape(NamedTuple):
    """Where a primitive reads: x = buffer[:, start:start + channels] of a [batch, total, side, side] buffer."""

    batch: int
    side: int
    total: int
    channels: int
    out: int  # output channels of a 1x1 conv (its weight is [out, channels])
    start: int = 0

    def describe(self) -> str:
        part = f"{self.start}:{self.start + self.channels} of {self.total}"
        return f"[{self.batch}, {part}, {self.side}, {self.side}] -> {self.out}"


def primitive_shapes(arch: Arch, batch: int, size: int) -> list:
    """(where, primitive, shape) at the widest layer of every block and at every transition of ``arch``.

    The layer's channel_stats read its k new channels, bn_relu its bottleneck (bn_size 4, as torchvision's
    DenseNets), bn_relu_conv1x1 the buffer's prefix; a transition reads the whole buffer.
    """
    side, c0, k = size // 4, arch.num_init_features, arch.growth_rate
    width, shapes = 4 * k, []
    for i, layers in enumerate(arch.block_config, 1):
        total, c = c0 + layers * k, c0 + (layers - 1) * k
        where = f"block {i} layer {layers}"
        shapes += [
            (where, "channel_stats", OpShape(batch, side, total, k, k, start=c)),
            (where, "bn_relu", OpShape(batch, side, width, width, width)),
            (where, "bn_relu_conv1x1", OpShape(batch, side, total, c, width)),
        ]
        if i < len(arch.block_config):
            shapes.append((f"transition {i}", "bn_relu_pool_conv1x1", OpShape(batch, side, total, total, total // 2)))
            side, c0 = side // 2, total // 2
    return shapes


def op_inputs(primitive, op, shape: OpShape, dtype, device, seed: int = 0) -> dict:
    """``op``'s arguments, named as its reference's parameters: x a channel slice of a channels-last buffer,
    statistics and affine parameters in the accumulation dtype, a weight scaled as kaiming's, the gradient
    shaped as the primitive's forward output, the gradient buffer as x's buffer; training=True."""
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)

    def randn_like(t):
        return torch.empty_like(t).copy_(torch.randn(t.shape, generator=gen))

    def randn(*size, dtype=acc):
        return torch.randn(size, generator=gen).to(device, dtype)

    c = shape.channels
    buf = torch.empty(shape.batch, shape.total, shape.side, shape.side, dtype=dtype, device=device)
    buf = randn_like(buf.to(memory_format=torch.channels_last))
    values = {
        "x": buf[:, shape.start : shape.start + c],
        "mean": 0.2 * randn(c),
        "invstd": 0.5 + randn(c).abs(),
        "gamma": randn(c),
        "beta": randn(c),
        "weight": randn(shape.out, c, dtype=dtype) * c**-0.5,
        "grad_buffer": randn_like(buf),
        "training": True,
    }
    names = list(inspect.signature(op.reference).parameters)
    if "grad_y" in names or "grad_z" in names:
        forward = primitive.ops[primitive.name].reference
        out = forward(*[values[n] for n in inspect.signature(forward).parameters])
        values["grad_y"] = values["grad_z"] = randn_like(out)
    return {name: values[name] for name in names}


def max_relative_error(op, args: dict) -> tuple[float, str]:
    """(max |triton - reference| / max |reference|, over the output where it is largest, and that output's name);
    the gradient buffer an op adds into counts as an output."""
    results = []
    for backend in ("triton", "reference"):
        call = {name: a.clone() if name == "grad_buffer" else a for name, a in args.items()}
        out = op.kernels[backend](*call.values())
        outs = {f"out[{i}]": t for i, t in enumerate(out)} if isinstance(out, tuple) else {"out": out}
        results.append({**outs, **({"grad_buffer": call["grad_buffer"]} if "grad_buffer" in call else {})})
    errors = {}
    for name, got in results[0].items():
        want = results[1][name].double()
        errors[name] = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def ops():
    """(primitive, op) for every op in PRIMITIVES: each primitive's forward op, then its backward op."""
    return [(p, op) for p in PRIMITIVES.values() for op in sorted(p.ops.values(), key=lambda op: op.name != p.name)]

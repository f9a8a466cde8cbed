"""Declaring a fused primitive: each of its ops is one ``Op(...)``, which builds all the registrations.

An op is declared from its pure-PyTorch reference, its fake, its Triton launcher and, for a forward op,
how it differentiates (``_autograd.Autograd``).  From those it builds:

* the ``torch.library.custom_op`` ``densenet_fused::<name>``, whose schema is the reference's annotated
  signature plus the arguments only autograd reads (``training``);
* its kernel table, backend -> callable: the reference, the C++ op ``densenet_fused::<name>_cpp`` when
  the extension registers one (its fake is registered too) and the Triton launcher when triton is
  installed;
* one ``register_kernel`` per device type with a kernel (``_backend.DEVICE_BACKENDS``), the reference
  for every other device, each of them overridden by a forced ``DENSENET_FUSED_BACKEND``;
* the fake and the autograd registration.

Ops that normalize take per-channel statistics [C], or per-sample ones [N, C] (instance norm).  The
reference computes both; the kernels are written for per-channel statistics and run per-sample ones once
per sample (``_per_sample``), which is exact: one sample with its own statistics is a batch of one.

``PRIMITIVES`` lists every primitive with its ops, in import order, for the tests and for tools.
"""

import inspect
from dataclasses import dataclass, field

import torch

from ._autograd import Autograd
from ._backend import CPP_AVAILABLE, DEVICE_BACKENDS, TRITON_AVAILABLE, forced_backend
from .layout import empty_like_layout


@dataclass
class Primitive:
    """A fused primitive: its ops by name (a forward op, and its backward op when it has one)."""

    name: str
    ops: dict = field(default_factory=dict)


PRIMITIVES: dict[str, Primitive] = {}
_SAMPLED = ("x", "grad_y", "grad_z", "grad_buffer")  # [N, ...] tensors: sample n is [n:n+1]
_STATS = ("mean", "invstd")  # per-sample statistics [N, C]: sample n's are row n


class Op:
    """One custom op of a primitive and the table of its kernels (see the module docstring)."""

    def __init__(self, primitive: str, name: str, reference, fake, *, triton=None, autograd=Autograd(),
                 mutates_args=()):  # fmt: skip
        self.name, self.reference = name, reference
        self.kernels, self._runners = {"reference": reference}, {}
        self.cpp_name = f"{name}_cpp" if CPP_AVAILABLE and hasattr(torch.ops.densenet_fused, f"{name}_cpp") else None
        if self.cpp_name:
            self.kernels["cpp"] = getattr(torch.ops.densenet_fused, self.cpp_name)
            torch.library.register_fake(f"densenet_fused::{self.cpp_name}", fake)
        if triton is not None and TRITON_AVAILABLE:
            self.kernels["triton"] = triton

        # The op takes the reference's arguments (all the kernels see), then those only autograd reads.
        signature = inspect.signature(reference)
        self._names = list(signature.parameters)
        self._arity, self._x = len(self._names), self._names.index("x")
        extra = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in autograd.args]
        default = self._route("reference")
        default.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        self.custom_op = torch.library.custom_op(f"densenet_fused::{name}", default, mutates_args=mutates_args)
        for device, backend in DEVICE_BACKENDS.items():
            if backend in self.kernels:
                self.custom_op.register_kernel(device, self._route(backend))
        self.custom_op.register_fake(lambda *args: fake(*args[: self._arity]))
        if autograd.backward is not None:
            self.custom_op.register_autograd(autograd.backward, setup_context=autograd.setup_context)
        PRIMITIVES.setdefault(primitive, Primitive(primitive)).ops[name] = self

    def _route(self, backend: str):
        """The kernel the dispatcher runs for one device type: ``backend``'s, unless another is forced."""

        def run(*args):
            chosen = forced_backend(args[self._x], self.kernels) or backend
            return self.runner(chosen)(*args[: self._arity])

        return run

    def runner(self, backend: str):
        """``backend``'s kernel as a callable of the reference's arguments, run once per sample when the
        statistics are per sample (the block's hot path calls these directly, without dispatch)."""
        if backend not in self._runners:
            kernel = self.kernels[backend]

            def run(*args):
                return self._per_sample(kernel, args) if self._per_sample_stats(args) else kernel(*args)

            self._runners[backend] = kernel if backend == "reference" else run
        return self._runners[backend]

    def _per_sample_stats(self, args) -> bool:
        return "mean" in self._names and args[self._names.index("mean")].dim() == 2

    def _per_sample(self, kernel, args):
        """``kernel`` run once per sample n, on x[n:n+1] (and the other [N, ...] tensors' sample n) with row n
        of the statistics; outputs with a batch dimension are gathered, parameter gradients summed."""
        x = args[self._x]
        if x.size(0) == 0:  # nothing to run per sample: the reference gives the empty outputs
            return self.reference(*args)
        results = []
        for n in range(x.size(0)):
            sample = [a[n] if name in _STATS else a[n : n + 1] if name in _SAMPLED else a for name, a in zip(self._names, args)]
            result = kernel(*sample)
            results.append(result if isinstance(result, tuple) else (result,))
        outputs = []
        for parts in zip(*results):
            if parts[0].dim() == x.dim():  # an activation [1, C, *spatial] per sample
                out = empty_like_layout(x, parts[0].size(1), parts[0].dtype, parts[0].shape[2:])
                for n, part in enumerate(parts):
                    out[n : n + 1].copy_(part)
            else:
                out = torch.stack(parts).sum(0)
            outputs.append(out)
        return tuple(outputs) if isinstance(result, tuple) else outputs[0]

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

``PRIMITIVES`` lists every primitive with its ops, in import order, for the tests and for tools.
"""

import inspect
from dataclasses import dataclass, field

import torch

from ._autograd import Autograd
from ._backend import CPP_AVAILABLE, DEVICE_BACKENDS, TRITON_AVAILABLE, forced_backend


@dataclass
class Primitive:
    """A fused primitive: its ops by name (a forward op, and its backward op when it has one)."""

    name: str
    ops: dict = field(default_factory=dict)


PRIMITIVES: dict[str, Primitive] = {}


class Op:
    """One custom op of a primitive and the table of its kernels (see the module docstring)."""

    def __init__(self, primitive: str, name: str, reference, fake, *, triton=None, autograd=Autograd(),
                 mutates_args=()):  # fmt: skip
        self.name, self.reference = name, reference
        self.kernels = {"reference": reference}
        self.cpp_name = f"{name}_cpp" if CPP_AVAILABLE and hasattr(torch.ops.densenet_fused, f"{name}_cpp") else None
        if self.cpp_name:
            self.kernels["cpp"] = getattr(torch.ops.densenet_fused, self.cpp_name)
            torch.library.register_fake(f"densenet_fused::{self.cpp_name}", fake)
        if triton is not None and TRITON_AVAILABLE:
            self.kernels["triton"] = triton

        # The op takes the reference's arguments (all the kernels see), then those only autograd reads.
        signature = inspect.signature(reference)
        self._arity = len(signature.parameters)
        self._x = list(signature.parameters).index("x")
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
            return self.kernels[chosen](*args[: self._arity])

        return run

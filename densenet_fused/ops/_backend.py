"""Which implementation of a fused primitive runs, and the environment settings that steer it.

Every primitive has a pure-PyTorch reference (the oracle), C++ CPU kernels from the compiled extension
``densenet_fused._C`` and Triton GPU kernels.  Each op registers, through ``torch.library``, the kernel
of every device type that has one (``DEVICE_BACKENDS``: C++ for "cpu", Triton for "cuda"), so the
dispatcher picks it by the tensors' device; other devices, and CPU tensors when the extension is not
built, run the reference.  ``DENSENET_FUSED_BACKEND=reference|cpp|triton`` forces one everywhere; a
forced backend that cannot run on the tensor raises instead of silently running something else.

The settings (``DENSENET_FUSED_BACKEND``, ``TRITON_INTERPRET``) are read once, when this module is
imported, into ``config``: the hot path reads no environment.  Assign ``config.backend`` (or call
``config.reload()`` after changing the environment) to switch later.  Triton itself reads
TRITON_INTERPRET when it is imported: set it before that.  The precision of float32 GEMMs follows
torch's own flags (see ``_triton.input_precision``).
"""

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "triton")
DEVICE_BACKENDS = {"cpu": "cpp", "cuda": "triton"}
BUILD_COMMAND = "pip install -e . --no-build-isolation"


class Config:
    """The environment settings, read once (see the module docstring); assign ``backend`` to override."""

    def __init__(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Read ``DENSENET_FUSED_BACKEND`` (the forced backend, "" for each device's own) and ``TRITON_INTERPRET``
        (Triton kernels run on CPU tensors through Triton's interpreter) from the environment."""
        self.backend = os.environ.get("DENSENET_FUSED_BACKEND", "")
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"

    def __setattr__(self, name, value):
        if name == "backend" and value not in ("", *BACKENDS):
            raise ValueError(f"DENSENET_FUSED_BACKEND must be one of {BACKENDS}, got {value!r}")
        super().__setattr__(name, value)


config = Config()


def _load_extension() -> bool:
    """Import the compiled kernels (their TORCH_LIBRARY registrations); warn once when missing."""
    try:
        importlib.import_module("densenet_fused._C")
    except ImportError as error:
        warnings.warn(
            f"densenet_fused._C is not built ({error}); CPU tensors run the pure-PyTorch reference "
            f"path. Build the kernels with: {BUILD_COMMAND}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


CPP_AVAILABLE = _load_extension()
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def forced_backend(x: torch.Tensor, implemented=BACKENDS) -> str:
    """The backend ``DENSENET_FUSED_BACKEND`` forces for ``x`` ("" when none is); raises if it cannot run."""
    forced = config.backend
    if not forced:
        return ""
    if forced not in implemented:
        raise NotImplementedError(f"this primitive has no {forced!r} backend (it has {tuple(implemented)})")
    if forced == "cpp" and not CPP_AVAILABLE:
        raise RuntimeError(f"DENSENET_FUSED_BACKEND=cpp but densenet_fused._C is not built: {BUILD_COMMAND}")
    if forced == "cpp" and x.device.type != "cpu":
        raise RuntimeError(f"DENSENET_FUSED_BACKEND=cpp has CPU kernels only, got a {x.device.type} tensor")
    if forced == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("DENSENET_FUSED_BACKEND=triton but triton is not installed")
        if x.device.type == "cpu" and not config.interpret:
            raise RuntimeError(
                "DENSENET_FUSED_BACKEND=triton on CPU tensors needs Triton's interpreter: "
                "set TRITON_INTERPRET=1 before anything imports triton"
            )
    return forced


def backend_for(x: torch.Tensor, implemented=BACKENDS) -> str:
    """The backend a primitive with the ``implemented`` ones runs on ``x``: the forced one, else x's device's."""
    device_backend = DEVICE_BACKENDS.get(x.device.type, "reference")
    available = {"reference": True, "cpp": CPP_AVAILABLE, "triton": TRITON_AVAILABLE}[device_backend]
    if device_backend not in implemented or not available:
        device_backend = "reference"
    return forced_backend(x, implemented) or device_backend

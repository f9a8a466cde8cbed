"""Settings a check changes for a block of code and restores after: torch's float32 precision flags, and the
backend densenet_fused's primitives run on.

Float32 precision goes through torch's own flags, as cuDNN convolutions and cuBLAS GEMMs follow them:
``torch.backends.cudnn.conv.fp32_precision`` and ``torch.backends.cuda.matmul.fp32_precision`` where this
torch has them ("ieee" or "tf32"), else the older ``allow_tf32`` flags. torch refuses to read the older
flags once the newer ones were set differently, so only one API is used.
"""

import contextlib
import os

import torch

NEW_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")


def _flags():
    if NEW_API:
        return [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
    return [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]


def fp32_precision() -> dict:
    """{"conv": ..., "matmul": ...}: the float32 precision of convolutions and of GEMMs, as torch's flags say."""
    (conv, conv_name), (matmul, matmul_name) = _flags()
    return {"conv": getattr(conv, conv_name), "matmul": getattr(matmul, matmul_name)}


@contextlib.contextmanager
def fp32(conv: str, matmul: str = "ieee"):
    """Float32 convolutions (cuDNN's, and densenet_fused's 1x1 convolutions, which follow the same flag) and
    float32 GEMMs in ``conv`` / ``matmul`` precision, "ieee" or "tf32"; the flags are restored after."""
    flags = _flags()
    saved = [getattr(module, name) for module, name in flags]
    for (module, name), value in zip(flags, (conv, matmul)):
        setattr(module, name, value if NEW_API else value == "tf32")
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


@contextlib.contextmanager
def environ(**values: str):
    """Set environment variables, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def fused_backend(backend: str):
    """Force densenet_fused's primitives onto ``backend`` ("reference", "cpp" or "triton") for the block.

    ``densenet_fused.ops._backend.config.backend`` is assigned where it is assignable (the package reads
    ``DENSENET_FUSED_BACKEND`` once, at import, into it); where it is a property that reads the environment
    at each call, the environment variable is set instead.
    """
    from densenet_fused.ops import _backend

    config = _backend.config
    saved = config.backend
    try:
        config.backend = backend
    except AttributeError:  # read-only: this tree reads DENSENET_FUSED_BACKEND at each call
        with environ(DENSENET_FUSED_BACKEND=backend):
            yield
        return
    try:
        yield
    finally:
        config.backend = saved

"""The block's hot path per backend: the kernels of one dense layer, chosen once per block call.

The block ops (``block.ops``) run every layer as calls of one ``LayerKernels`` object:

* ``copy(src, dst, stats, keep, drop_scale)``: a layer's new channels into the buffer (dropout applied),
  and their statistics, once per channel;
* ``conv1x1(x, norm, weight, stats)``: BN -> ReLU -> 1x1 conv of the buffer's prefix, and the statistics
  of the bottleneck it writes (norm2's);
* ``bn_relu(x, norm)``: BN -> ReLU before the 3x3 conv (which is torch's);
* ``bn_relu_backward(grad_z, x, norm, training)`` and ``conv1x1_backward(grad_y, x, norm, weight,
  grad_buffer, training)``, which adds its input gradient into the shared gradient buffer.

``norm`` is an ``ops.NormArgs``: the buffer's batch statistics (mean and biased variance, with the norm's
eps) or the running ones, gamma and beta.  Statistics outputs are (mean, var) tensors to write.

Backends:

* ``triton`` (CUDA tensors; CPU tensors under Triton's interpreter): its kernels launched directly, the
  statistics reduced where the data is produced (the GEMM's epilogue, the copy) and finalized on the
  device, no glue op: batch statistics of this process.
* ``ops``: each primitive's kernel from its op's table (C++ for CPU tensors, the reference elsewhere or
  when forced, Triton where the others cannot run): instance norms' per-sample statistics and
  synchronized BatchNorms (see ``distributed``) take this path on every device.

A CUDA C++ backend would be one more module here offering the same five calls.
"""

from ..ops._backend import backend_for
from ..ops._triton import runs_triton
from .ops import OpKernels
from .triton import TritonKernels

__all__ = ["OpKernels", "TritonKernels", "layer_kernels"]


def layer_kernels(x, instance: bool, sync):
    """The kernels a block on ``x`` (its buffer's dtype, device and size) runs: the Triton ones where they apply
    (the device's or the forced backend is Triton, batch statistics, no synchronization, a size the kernels
    take), else ``OpKernels``, whose kernels fall back to the reference for what they cannot take."""
    backend = backend_for(x)
    if backend == "triton" and not instance and sync is None and runs_triton(x):
        return TritonKernels()
    return OpKernels(backend, instance, sync)

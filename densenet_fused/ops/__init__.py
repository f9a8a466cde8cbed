"""The fused primitives, one file each; every op dispatches by device (see ``_backend``).

``PRIMITIVES`` (name -> ``_primitive.Primitive``) lists each primitive with its ops and their kernels.
"""

from ._primitive import PRIMITIVES
from .bn_relu import bn_relu, bn_relu_backward
from .bn_relu_conv1x1 import bn_relu_conv1x1, bn_relu_conv1x1_backward
from .bn_relu_pool_conv1x1 import bn_relu_pool_conv1x1, bn_relu_pool_conv1x1_backward
from .channel_stats import channel_stats

__all__ = [
    "PRIMITIVES",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_conv1x1",
    "bn_relu_conv1x1_backward",
    "bn_relu_pool_conv1x1",
    "bn_relu_pool_conv1x1_backward",
    "channel_stats",
]

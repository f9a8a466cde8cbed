"""The fused primitives, one file each; every one dispatches by device (see ``_backend``)."""

from .bn_relu import bn_relu, bn_relu_backward
from .bn_relu_conv1x1 import bn_relu_conv1x1, bn_relu_conv1x1_backward
from .bn_relu_pool_conv1x1 import bn_relu_pool_conv1x1, bn_relu_pool_conv1x1_backward
from .channel_stats import channel_stats

__all__ = [
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_conv1x1",
    "bn_relu_conv1x1_backward",
    "bn_relu_pool_conv1x1",
    "bn_relu_pool_conv1x1_backward",
    "channel_stats",
]

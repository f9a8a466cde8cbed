"""Memory-efficient DenseNets: a drop-in replacement for torchvision's, with fused kernels."""

from .block import DenseBlock, DenseLayer, Transition
from .convert import convert
from .models import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "Transition",
    "convert",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
]

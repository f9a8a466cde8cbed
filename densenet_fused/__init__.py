"""Memory-efficient DenseNets: a drop-in replacement for torchvision's, with fused kernels."""

from . import tracing
from .block import DenseBlock, DenseLayer, Transition
from .convert import convert
from .models import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc
from .monai import load_monai_state_dict, monai_state_dict

tracing.register_timm_leaves()

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
    "densenet_bc",
    "load_monai_state_dict",
    "monai_state_dict",
]

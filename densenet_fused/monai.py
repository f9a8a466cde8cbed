"""MONAI checkpoints: a MONAI DenseNet's state_dict and ours differ only in their keys.

MONAI nests each dense layer's modules in ``layers`` and names the classifier ``class_layers.out``; ours
(torchvision's) keep them on the layer and call it ``classifier``.  MONAI itself is not needed.
"""

import re

from torch import nn

_TO_OURS = [
    (re.compile(r"^(.*\.denselayer\d+)\.layers\.(.+)$"), r"\1.\2"),
    (re.compile(r"^class_layers\.out\."), "classifier."),
]
_TO_MONAI = [
    (re.compile(r"^(.*\.denselayer\d+)\.((?:norm|conv)[12]\..+)$"), r"\1.layers.\2"),
    (re.compile(r"^classifier\."), "class_layers.out."),
]


def _renamed(state_dict: dict, rules: list) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


def monai_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` under MONAI's keys, for a MONAI ``DenseNet`` of the same configuration to load."""
    return _renamed(model.state_dict(), _TO_MONAI)


def load_monai_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a MONAI ``DenseNet`` state_dict into ``model`` (e.g. one ``DenseNet.from_monai_config`` built).

    Returns what ``model.load_state_dict`` returns; with ``strict=True`` a key MONAI's network has and ours
    has not (or the reverse) raises, as ``load_state_dict`` does.
    """
    return model.load_state_dict(_renamed(state_dict, _TO_OURS), strict=strict)

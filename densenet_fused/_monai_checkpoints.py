"""MONAI's checkpoints and pretrained weights for our DenseNet: MONAI itself is not needed.

A MONAI DenseNet's state_dict and ours differ only in their keys: MONAI nests each dense layer's modules in
``layers`` and names the classifier ``class_layers.out`` (and a PReLU head ``class_layers.relu``); ours
(torchvision's) keep them on the layer and call them ``classifier`` (and ``relu5``).  ``rename_monai_keys`` is
the load_state_dict pre-hook every ``DenseNet`` registers, so that ``load_state_dict`` takes MONAI's keys as they
are (as torchvision's loader renames its legacy DenseNet keys).
"""

import re

import torch
from torch import nn

_TO_OURS = [
    (re.compile(r"^(.*\.denselayer\d+)\.layers\.(.+)$"), r"\1.\2"),
    (re.compile(r"^class_layers\.out\."), "classifier."),
    (re.compile(r"^class_layers\.relu\."), "relu5."),
]
_TO_MONAI = [
    (re.compile(r"^(.*\.denselayer\d+)\.((?:norm|relu|conv)[12]\..+)$"), r"\1.layers.\2"),
    (re.compile(r"^classifier\."), "class_layers.out."),
    (re.compile(r"^relu5\."), "class_layers.relu."),
]


def _renamed_key(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


def renamed(state_dict: dict, rules: list) -> dict:
    return {_renamed_key(key, rules): value for key, value in state_dict.items()}


def to_ours(state_dict: dict) -> dict:
    return renamed(state_dict, _TO_OURS)


def to_monai(state_dict: dict) -> dict:
    return renamed(state_dict, _TO_MONAI)


def rename_monai_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook of ``DenseNet``: rename MONAI's keys under ``prefix`` to ours, in place (the dict
    is load_state_dict's own copy).  A key whose new name is already there is left as it is (and so is reported
    as unexpected by a strict load)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        new_key = prefix + _renamed_key(key[len(prefix) :], _TO_OURS)
        if new_key != key and new_key not in state_dict:
            state_dict[new_key] = state_dict.pop(key)


# MONAI's monai.networks.nets.densenet._load_state_dict: the same URLs, so the same torch.hub cache files.
MODEL_URLS = {
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "densenet169": "https://download.pytorch.org/models/densenet169-b2777c0a.pth",
    "densenet201": "https://download.pytorch.org/models/densenet201-c1103571.pth",
}
# The published files hold the legacy keys 'denselayerN.norm.1.weight', ...; MONAI renames them to its own.
_LEGACY = re.compile(r"^(.*denselayer\d+)(\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def check_pretrained(arch: str, spatial_dims: int) -> None:
    """MONAI's errors for ``pretrained=True``, same types and messages."""
    if arch == "densenet264":
        raise NotImplementedError("Currently PyTorch Hub does not provide densenet264 pretrained models.")
    if spatial_dims > 2:
        raise NotImplementedError(
            "Parameter `spatial_dims` is > 2 ; currently PyTorch Hub does not"
            "provide pretrained models for more than two spatial dimensions."
        )


def load_pretrained(model: nn.Module, arch: str, progress: bool) -> None:
    """MONAI's ``_load_state_dict(model, arch, progress)`` on our DenseNet: fetch torchvision's ImageNet weights
    through torch.hub's loader, rename them as MONAI does, and load those whose MONAI key and shape match
    MONAI's network.  The rest stays as initialized: the classifier always (the file names it ``classifier``,
    MONAI ``class_layers.out``), conv0 when ``in_channels != 3``, and any layer another configuration reshapes.
    """
    url = MODEL_URLS.get(arch)
    if url is None:
        raise ValueError(
            "only 'densenet121', 'densenet169' and 'densenet201' are supported to load pretrained weights."
        )
    state_dict = torch.hub.load_state_dict_from_url(url, progress=progress, weights_only=True)
    state_dict = {
        (res.group(1) + ".layers" + res.group(2) + res.group(3) if (res := _LEGACY.match(key)) else key): value
        for key, value in state_dict.items()
    }
    model_dict = to_monai(model.state_dict())  # the keys MONAI's network has
    model_dict.update({k: v for k, v in state_dict.items() if k in model_dict and model_dict[k].shape == v.shape})
    model.load_state_dict(model_dict)  # MONAI's keys: rename_monai_keys takes them

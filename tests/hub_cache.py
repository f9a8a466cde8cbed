"""A torch.hub cache of generated ImageNet DenseNet checkpoints: the real weight-loading paths run without a network.

torchvision's ``weights=``/``pretrained=`` and MONAI's ``pretrained=True`` both call
``torch.hub.load_state_dict_from_url(url)``, which reads ``$TORCH_HOME/hub/checkpoints/<basename of the URL's
path>`` when that file exists and downloads it only when it does not (torchvision's ``check_hash=True`` checks
the hash prefix of the file name against a download only, never against a cached file).  The ``torch_home``
fixture points ``TORCH_HOME`` at a temporary cache whose files are written once per session, and makes a
download fail at once.

A generated file is laid out as the published ones: torchvision's ImageNet network for that URL, with random
weights and running statistics (He-scaled; none equal to a fresh initialization), under the legacy dense-layer
keys (``denselayer1.norm.1.weight``) that torchvision's and MONAI's loaders rename, without
``num_batches_tracked``.
"""

import os
import re
import urllib.parse

import pytest
import torch
import torchvision
from torchvision.models import densenet as tv

WEIGHTS = {name: getattr(tv, f"DenseNet{name[8:]}_Weights").IMAGENET1K_V1 for name in tv.__all__ if name[8:].isdigit()}
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$")


def hub_file_name(url: str) -> str:
    """The cache file name ``torch.hub.load_state_dict_from_url`` uses for ``url`` (no ``file_name``)."""
    return os.path.basename(urllib.parse.urlparse(url).path)


def generated_checkpoint(name: str, seed: int = 0) -> dict:
    """Random weights of the shapes of torchvision's ImageNet ``name`` (e.g. "densenet121"), legacy keys."""
    with torch.device("meta"):  # shapes only: no initialization to pay for
        shapes = {key: value.shape for key, value in getattr(torchvision.models, name)().state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            continue
        if len(shape) > 1:  # conv and linear weights: He-scaled, so a deep network's activations stay O(1)
            value = torch.randn(shape, generator=generator) * (2 / shape[1:].numel()) ** 0.5
        elif key.endswith("running_var") or re.search(r"norm\d?\.weight$", key):  # variances, norm scales
            value = torch.rand(shape, generator=generator) + 0.5
        else:  # biases and running means
            value = torch.randn(shape, generator=generator) * 0.1
        state[_LEGACY.sub(r"\1.\2.\3", key)] = value
    return state


class HubCache:
    """``root`` as ``TORCH_HOME``: ``checkpoint(name)`` writes ``name``'s generated file there once."""

    def __init__(self, root):
        self.root = str(root)
        self.checkpoints = os.path.join(self.root, "hub", "checkpoints")
        os.makedirs(self.checkpoints, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.checkpoints, hub_file_name(WEIGHTS[name].url))

    def checkpoint(self, name: str, read: bool = True) -> dict | None:
        """Write the file for torchvision's ``name`` weights (once) and return what it holds."""
        path = self.path(name)
        if not os.path.exists(path):
            torch.save(generated_checkpoint(name), path + ".part")
            os.replace(path + ".part", path)
        return torch.load(path, weights_only=True) if read else None


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    return HubCache(tmp_path_factory.mktemp("torch_home"))


@pytest.fixture
def torch_home(hub_cache, monkeypatch):
    """``TORCH_HOME`` is the session's generated cache, holding densenet121's file (MONAI's and torchvision's
    default; ``torch_home.checkpoint(name)`` adds another), and a file missing from it fails, not downloads."""

    def no_download(url, dst, *args, **kwargs):
        raise AssertionError(f"{url} is not in the generated hub cache ({dst}): tests do not download")

    monkeypatch.setenv("TORCH_HOME", hub_cache.root)
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert torch.hub.get_dir() == os.path.join(hub_cache.root, "hub")
    hub_cache.checkpoint("densenet121", read=False)
    return hub_cache

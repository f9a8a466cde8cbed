"""MONAI's DenseNets on the fused blocks: ``monai.networks.nets.densenet``'s names, signatures and defaults.

``DenseNet``, ``DenseNet121``, ``DenseNet169``, ``DenseNet201`` and ``DenseNet264`` (and MONAI's aliases
``Densenet``, ``Densenet121``, ``densenet121``, ...) build the network ``DenseNet.from_monai_config`` builds,
with MONAI's ``pretrained``: torchvision's ImageNet weights whose MONAI names and shapes fit, fetched through
torch.hub's loader (the same URLs and cache files as MONAI), with a fresh classifier (and conv0 when
``in_channels != 3``); a 3-D network or DenseNet264 with ``pretrained=True`` raises MONAI's
``NotImplementedError``.  MONAI itself is not needed.

Checkpoints: every ``densenet_fused.DenseNet`` loads a MONAI DenseNet's state_dict as it is
(``load_state_dict``, strict or not); ``monai_state_dict`` gives ours under MONAI's keys.
"""

from collections.abc import Sequence

from torch import nn

from . import _monai_checkpoints as checkpoints
from . import models

__all__ = [
    "DenseNet",
    "Densenet",
    "DenseNet121",
    "densenet121",
    "Densenet121",
    "DenseNet169",
    "densenet169",
    "Densenet169",
    "DenseNet201",
    "densenet201",
    "Densenet201",
    "DenseNet264",
    "densenet264",
    "Densenet264",
    "load_monai_state_dict",
    "monai_state_dict",
]


def monai_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` under MONAI's keys, for a MONAI ``DenseNet`` of the same configuration to load."""
    return checkpoints.to_monai(model.state_dict())


def load_monai_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a MONAI ``DenseNet`` state_dict into ``model`` (e.g. one ``DenseNet.from_monai_config`` built).

    Returns what ``model.load_state_dict`` returns; with ``strict=True`` a key MONAI's network has and ours
    has not (or the reverse) raises, as ``load_state_dict`` does.  (A ``densenet_fused.DenseNet`` also takes
    MONAI's keys in ``load_state_dict`` itself; this works for any model holding our key names.)
    """
    return model.load_state_dict(checkpoints.to_ours(state_dict), strict=strict)


class DenseNet(models.DenseNet):
    """MONAI's ``DenseNet(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
    bn_size, act, norm, dropout_prob)`` on the fused blocks (``models.DenseNet.from_monai_config``'s network).

    MONAI's "relu" (its default ``act``) or "prelu", MONAI's "batch" or "instance" norm, and MONAI's dropout (whole
    channels in 2-D and 3-D, single values in 1-D): anything else raises ``ValueError``.  Module names and
    state_dict keys are torchvision's; MONAI's keys load as they are.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        dropout_prob: float = 0.0,
    ) -> None:
        kwargs = models.monai_arguments(
            spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, bn_size, act, norm,
            dropout_prob,
        )  # fmt: skip
        super().__init__(**kwargs)

    @classmethod
    def from_monai_config(cls, *args, **kwargs) -> models.DenseNet:
        """``densenet_fused.DenseNet.from_monai_config`` (this class takes MONAI's arguments itself)."""
        return models.DenseNet.from_monai_config(*args, **kwargs)


class _NamedDenseNet(DenseNet):
    """MONAI's named DenseNets: a ``block_config`` default and ``pretrained``/``progress`` (MONAI's semantics:
    ``checkpoints.check_pretrained`` raises its errors, ``load_pretrained`` loads what fits)."""

    arch: str

    def _build(self, spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, pretrained,
               progress, kwargs) -> None:  # fmt: skip
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, init_features=init_features,
            growth_rate=growth_rate, block_config=block_config, **kwargs,
        )  # fmt: skip
        if pretrained:
            checkpoints.check_pretrained(self.arch, spatial_dims)
            checkpoints.load_pretrained(self, self.arch, progress)


class DenseNet121(_NamedDenseNet):
    """MONAI's DenseNet121 with optional pretrained support when `spatial_dims` is 2."""

    arch = "densenet121"

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64, growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16), pretrained: bool = False, progress: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        self._build(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, pretrained,
                    progress, kwargs)  # fmt: skip


class DenseNet169(_NamedDenseNet):
    """MONAI's DenseNet169 with optional pretrained support when `spatial_dims` is 2."""

    arch = "densenet169"

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64, growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 32, 32), pretrained: bool = False, progress: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        self._build(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, pretrained,
                    progress, kwargs)  # fmt: skip


class DenseNet201(_NamedDenseNet):
    """MONAI's DenseNet201 with optional pretrained support when `spatial_dims` is 2."""

    arch = "densenet201"

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64, growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 48, 32), pretrained: bool = False, progress: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        self._build(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, pretrained,
                    progress, kwargs)  # fmt: skip


class DenseNet264(_NamedDenseNet):
    """MONAI's DenseNet264 (no pretrained weights: ``pretrained=True`` raises MONAI's error)."""

    arch = "densenet264"

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64, growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 64, 48), pretrained: bool = False, progress: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        self._build(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, pretrained,
                    progress, kwargs)  # fmt: skip


Densenet = DenseNet
Densenet121 = densenet121 = DenseNet121
Densenet169 = densenet169 = DenseNet169
Densenet201 = densenet201 = DenseNet201
Densenet264 = densenet264 = DenseNet264

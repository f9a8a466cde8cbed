"""The activation modules the fused paths apply, ReLU (torchvision's) and PReLU (one of MONAI's), and a PReLU's
slope; anything else runs as modules (``block.unfused``).  ``block.modules.act_factory`` builds them from
MONAI's ``act`` specs."""

from torch import Tensor, nn

FUSED = (nn.ReLU, nn.PReLU)


def slope_of(act: nn.Module, norm: nn.Module) -> Tensor | None:
    """The slope of ``act`` after ``norm``: PReLU's weight ([1] or one per channel), None for a ReLU."""
    if type(act) is not nn.PReLU:
        return None
    if act.num_parameters not in (1, norm.num_features):  # F.prelu's error
        raise RuntimeError(
            f"Mismatch of parameter numbers and input channel size. Found parameter numbers = {act.num_parameters} "
            f"and channel size = {norm.num_features}."
        )
    return act.weight

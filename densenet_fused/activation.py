"""The activations the fused paths apply: ReLU (torchvision's) and PReLU (one of MONAI's), as modules and as
MONAI's ``act`` specs; anything else runs as modules (``block.unfused``) or is refused where it is built."""

from torch import Tensor, nn

FUSED = (nn.ReLU, nn.PReLU)


def act_factory(act: str | tuple = "relu"):
    """``() -> activation module`` for an activation spec: "relu" (torchvision's in-place ReLU) or "prelu"
    (``nn.PReLU``: one learnable slope, or ``num_parameters`` of them), alone or as MONAI's ``(name, kwargs)``
    (the kwargs go to the module, as MONAI's ``get_act_layer`` passes them)."""
    spec = (act, {}) if isinstance(act, str) else act
    names = {"relu": nn.ReLU, "prelu": nn.PReLU}
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], dict)
            and isinstance(spec[0], str) and spec[0].lower() in names):  # fmt: skip
        raise ValueError(
            f"the fused blocks apply act='relu' and act='prelu' (or MONAI's (name, kwargs)), got act={act!r}"
        )
    name, kwargs = spec[0].lower(), dict(spec[1])
    if name == "relu":
        kwargs = {"inplace": True, **kwargs}
    return lambda: names[name](**kwargs)


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

"""What each layer of a block does in one forward, packed into the block ops' arguments."""

from dataclasses import dataclass, fields
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class _LayerPlan:
    """What one layer does in this forward: its widths, batch or running statistics per norm (``training``,
    as in F.batch_norm and the primitives), dropout, and whether backward recomputes the bottleneck."""

    growth: int
    width: int
    training1: bool
    eps1: float
    training2: bool
    eps2: float
    drop: float
    keep_bottleneck: bool


class _LayerParams(NamedTuple):
    """The differentiable tensors one layer reads: each norm's affine parameters and each conv's weight."""

    gamma1: Tensor
    beta1: Tensor
    conv1: Tensor
    gamma2: Tensor
    beta2: Tensor
    conv2: Tensor


def _flatten(params: list[_LayerParams]) -> list[Tensor]:
    return [t for p in params for t in p]


def _unflatten(flat: list) -> list[_LayerParams]:
    n = len(_LayerParams._fields)
    return [_LayerParams(*flat[i : i + n]) for i in range(0, len(flat), n)]


def _running_stats(plans: list["_LayerPlan"], running: list[Tensor]) -> list[tuple]:
    """Per layer, (mean, invstd) of norm1 and of norm2 from the flat ``running`` list, None where a norm uses
    batch statistics (``running`` holds only the others, in layer order)."""
    stats = iter(running)
    return [tuple(None if training else (next(stats), next(stats)) for training in (plan.training1, plan.training2)) for plan in plans]


_PLAN_FIELDS = tuple(f.name for f in fields(_LayerPlan))
# The block ops take the plans field by field, as lists: "int[] growth, int[] width, bool[] training1, ..."
_PLAN_SCHEMA = ", ".join(f"{f.type.__name__}[] {f.name}" for f in fields(_LayerPlan))


def _plan_args(plans: list[_LayerPlan]) -> list[list]:
    """The plans as the op's per-field lists (growth: int[], width: int[], training1: bool[], ...)."""
    return [[getattr(plan, name) for plan in plans] for name in _PLAN_FIELDS]


def _plans(plan_args) -> list[_LayerPlan]:
    return [_LayerPlan(*values) for values in zip(*plan_args)]

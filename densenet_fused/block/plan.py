"""What each layer of a block does in one forward, packed into the block ops' arguments."""

from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

from torch import Tensor

from ..ops._norm_args import NormArgs
from ..ops.prelu import prelu_args


@dataclass(frozen=True)
class _LayerPlan:
    """What one layer does in this forward: its widths, batch or running statistics per norm (``training``,
    as in F.batch_norm and the primitives), whether each activation is a PReLU (``prelu``: its slope is in the
    params, else ReLU), dropout, and whether backward recomputes the bottleneck."""

    growth: int
    width: int
    training1: bool
    eps1: float
    training2: bool
    eps2: float
    prelu1: bool
    prelu2: bool
    drop: float
    keep_bottleneck: bool


class _LayerParams(NamedTuple):
    """The differentiable tensors one layer reads: each norm's affine parameters, each conv's weight and each
    PReLU's slope (None for a ReLU)."""

    gamma1: Tensor
    beta1: Tensor
    conv1: Tensor
    gamma2: Tensor
    beta2: Tensor
    conv2: Tensor
    slope1: Optional[Tensor] = None
    slope2: Optional[Tensor] = None


_WITHOUT_SLOPES = len(_LayerParams._fields) - 2  # the tensors every layer has


def _flatten(params: list[_LayerParams]) -> list[Tensor]:
    """The tensors of ``params`` in order, without the slopes of ReLUs."""
    return [t for p in params for t in p if t is not None]


def _unflatten(flat: list, plans: list[_LayerPlan]) -> list[_LayerParams]:
    """``_flatten``'s inverse: the plans say which layers have slopes."""
    tensors, layers = iter(flat), []
    for plan in plans:
        base = [next(tensors) for _ in range(_WITHOUT_SLOPES)]
        slopes = [next(tensors) if prelu else None for prelu in (plan.prelu1, plan.prelu2)]
        layers.append(_LayerParams(*base, *slopes))
    return layers


def layer_norms(plans, layers, running, mean, var, mean2, var2) -> list[tuple[NormArgs, NormArgs]]:
    """Per layer, (norm1, norm2) as the kernels take them: the batch statistics of the layer's input channels
    (mean, var: the block's, [C] or per sample [N, C]) and of its bottleneck (mean2[l], var2[l]), or the running
    statistics from the flat ``running`` list (mean, var of each norm that uses them, in layer order)."""
    stats, norms = iter(running), []
    for l, (plan, p) in enumerate(zip(plans, layers)):
        c = p.conv1.size(1)
        first = (next(stats), next(stats)) if not plan.training1 else (mean.narrow(-1, 0, c), var.narrow(-1, 0, c))
        second = (next(stats), next(stats)) if not plan.training2 else (mean2[l], var2[l])
        norms.append((NormArgs(*first, p.gamma1, p.beta1, plan.eps1), NormArgs(*second, p.gamma2, p.beta2, plan.eps2)))
    return norms


def layer_prelus(layers, norms) -> list[list]:
    """Per layer, the ``ops.prelu.PReLUArgs`` of its two activations after ``norms`` (``layer_norms``), None for
    a ReLU: one op negates them for the whole block."""
    found = [(l, i, slope) for l, p in enumerate(layers) for i, slope in enumerate((p.slope1, p.slope2))
             if slope is not None]  # fmt: skip
    args = prelu_args([norms[l][i] for l, i, _ in found], [slope for *_, slope in found])
    prelus = [[None, None] for _ in layers]
    for (l, i, _), prelu in zip(found, args):
        prelus[l][i] = prelu
    return prelus


_PLAN_FIELDS = tuple(f.name for f in fields(_LayerPlan))
# The block ops take the plans field by field, as lists: "int[] growth, int[] width, bool[] training1, ..."
_PLAN_SCHEMA = ", ".join(f"{f.type.__name__}[] {f.name}" for f in fields(_LayerPlan))


def _plan_args(plans: list[_LayerPlan]) -> list[list]:
    """The plans as the op's per-field lists (growth: int[], width: int[], training1: bool[], ...)."""
    return [[getattr(plan, name) for plan in plans] for name in _PLAN_FIELDS]


def _plans(plan_args) -> list[_LayerPlan]:
    return [_LayerPlan(*values) for values in zip(*plan_args)]

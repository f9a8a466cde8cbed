"""From a block's modules to one call of the block op, and the norms' running statistics after it."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import norm as bn
from ..ops.layout import acc_dtype, empty_like_layout
from .autograd import _WRITES_GRADIENTS, _DenseBlockFunction, _EagerDenseBlockFunction, _compiled_autograd_on
from .inputs import _batch_group, _check_input, _instance
from .plan import _flatten, _LayerParams, _LayerPlan, _plan_args


def _dropout_masks(x: Tensor, growth: int, plans: list[_LayerPlan]) -> list[Tensor]:
    """The dropout masks of the layers that drop, as bool, drawn in layer order the way torchvision's F.dropout
    calls draw them (same shape, dtype and layout as each layer's new features)."""
    drops = [plan.drop for plan in plans if plan.drop > 0]
    if not drops:  # the common case: no tensor to allocate
        return []
    ones = empty_like_layout(x, growth).fill_(1)
    return [F.dropout(ones, drop, True) != 0 for drop in drops]



def dense_layers_forward(layers: list, inputs: Tensor | list[Tensor], what: str) -> Tensor:
    """Run ``layers`` over one buffer holding ``inputs`` (a tensor or a list) concatenated; return the buffer."""
    first = layers[0]
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    weights = [(layer.conv1.weight, layer.conv2.weight) for layer in layers]  # once: parametrizations may have state
    dtype = _check_input(inputs, first.norm1.num_features, weights[0][0], what)
    inputs = [x.to(dtype) for x in inputs]
    x = inputs[0]
    acc = acc_dtype(dtype)
    instance = _instance([norm for layer in layers for norm in (layer.norm1, layer.norm2)], what)
    plans, params, running, batch_norms = [], [], [], []
    for layer, (weight1, weight2) in zip(layers, weights):
        plan = _LayerPlan(
            growth=layer.conv2.out_channels,
            width=layer.conv1.out_channels,
            training1=bn.uses_batch_stats(layer.norm1),
            eps1=layer.norm1.eps,
            training2=bn.uses_batch_stats(layer.norm2),
            eps2=layer.norm2.eps,
            drop=layer.drop_rate if layer.training else 0.0,
            keep_bottleneck=not layer.memory_efficient,
        )
        plans.append(plan)
        for norm, batch in ((layer.norm1, plan.training1), (layer.norm2, plan.training2)):
            if batch:
                batch_norms.append(norm)
            else:
                running += (norm.running_mean, norm.running_var)
        gamma1, beta1 = bn.affine(layer.norm1, acc, x.device)
        gamma2, beta2 = bn.affine(layer.norm2, acc, x.device)
        # conv1's weight as it is (the kernels cast its tiles as autocast would), conv2's for cuDNN (as autocast casts)
        params.append(_LayerParams(gamma1, beta1, weight1, gamma2, beta2, weight2.to(dtype)))
    sync, count = None, None
    if batch_norms:
        size = torch.Size([x.size(0), first.norm1.num_features, *x.shape[2:]])
        sync, count = _batch_group(batch_norms, size, x, instance, what)
    masks = _dropout_masks(x, first.conv2.out_channels, plans)
    params, sizes = _flatten(params), [len(params) * len(_LayerParams._fields), len(running), len(masks)]
    group, group_count = (None, None) if sync is None else (sync.name, sync.count)
    eager = _WRITES_GRADIENTS and not torch.compiler.is_compiling() and not _compiled_autograd_on()
    function = _EagerDenseBlockFunction if eager else _DenseBlockFunction
    buf, mean, var, mean2, var2 = function.apply(
        len(inputs), sizes, _plan_args(plans), group, instance, group_count, *inputs, *params, *running, *masks
    )
    norms, means, variances = [], [], []
    for l, layer in enumerate(layers):
        if plans[l].training1:
            channels = layer.norm1.num_features
            norms.append(layer.norm1)
            means.append(mean.narrow(-1, 0, channels))
            variances.append(var.narrow(-1, 0, channels))
        if plans[l].training2:
            norms.append(layer.norm2)
            means.append(mean2[l])
            variances.append(var2[l])
    bn.update_running_stats_of(norms, means, variances, count)
    return buf

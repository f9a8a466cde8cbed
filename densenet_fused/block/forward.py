"""From a block's modules to one call of the block op, and the norms' running statistics after it."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import norm as bn
from .. import activation
from ..ops.layout import acc_dtype, empty_like_layout
from .autograd import _WRITES_GRADIENTS, _DenseBlockFunction, _EagerDenseBlockFunction, _compiled_autograd_on
from .inputs import _batch_group, _check_input, _instance
from .plan import _flatten, _LayerParams, _LayerPlan, _plan_args


def _dropout_masks(x: Tensor, growth: int, plans: list[_LayerPlan], layers: list) -> list[Tensor]:
    """The dropout masks of the layers that drop, as bool, drawn in layer order with the RNG draws the layers'
    own dropout would make: element dropout (torchvision's F.dropout) a mask shaped like the new features
    (same dtype and layout), channel dropout (``channel_dropout``: MONAI's Dropout2d/3d) one value per sample
    and channel, [N, k, 1, ...], which the block ops expand (it is never materialized per pixel)."""
    masks, ones = [], None
    for plan, layer in zip(plans, layers):
        if plan.drop <= 0:  # the common case: no tensor to allocate
            continue
        if channel_dropout(layer):
            masks.append(_channel_mask(x, growth, plan.drop))
            continue
        if ones is None:
            ones = empty_like_layout(x, growth).fill_(1)
        masks.append(F.dropout(ones, plan.drop, True) != 0)
    return masks


def channel_dropout(layer) -> bool:
    """Whether ``layer`` drops whole channels (a layer pickled before the attribute existed drops values)."""
    return getattr(layer, "channel_dropout", False)


def _channel_mask(x: Tensor, growth: int, drop: float) -> Tensor:
    """[N, growth, 1, ...] bool: the channels F.dropout1d/2d/3d keep, with their draws (ATen's feature dropout
    fills a [N, C, 1, ...] tensor of the input's dtype with ``bernoulli_(1 - p)``, and draws nothing at p = 1)."""
    shape = (x.size(0), growth, *[1] * (x.dim() - 2))
    if drop >= 1:
        return torch.zeros(shape, dtype=torch.bool, device=x.device)
    return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - drop) != 0


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
        slope1, slope2 = activation.slope_of(layer.relu1, layer.norm1), activation.slope_of(layer.relu2, layer.norm2)
        plan = _LayerPlan(
            growth=layer.conv2.out_channels,
            width=layer.conv1.out_channels,
            training1=bn.uses_batch_stats(layer.norm1),
            eps1=layer.norm1.eps,
            training2=bn.uses_batch_stats(layer.norm2),
            eps2=layer.norm2.eps,
            prelu1=slope1 is not None,
            prelu2=slope2 is not None,
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
        slopes = [None if slope is None else slope.to(acc) for slope in (slope1, slope2)]
        params.append(_LayerParams(gamma1, beta1, weight1, gamma2, beta2, weight2.to(dtype), *slopes))
    sync, count = None, None
    if batch_norms:
        size = torch.Size([x.size(0), first.norm1.num_features, *x.shape[2:]])
        sync, count = _batch_group(batch_norms, size, x, instance, what)
    masks = _dropout_masks(x, first.conv2.out_channels, plans, layers)
    params = _flatten(params)
    sizes = [len(params), len(running), len(masks)]
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

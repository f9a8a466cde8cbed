"""The network's two ends, fused: the stem's norm0 -> relu0 -> pool0 and the head's norm5 -> ReLU -> global average
(or PReLU, as two calls of the ReLU primitives: ``ops.prelu``).

Run as modules, autograd keeps norm0's output, the ReLU's and the max pool's indices beside conv0's output, and
norm5's output beside the last block's buffer.  Each end here is one custom op (a composite of the ``bn_relu``
primitives and torch's pooling ops) whose backward saves only its input, the statistics and the affine
parameters, and recomputes the rest.  Under ``create_graph=True`` the backward differentiates the pure-PyTorch
reference instead (``ops._autograd.bn_autograd``), so double backward works.

Only a plain BatchNorm computing this process's statistics, or an InstanceNorm (per-sample statistics, as in the
blocks), with no hooks, is fused; ``DenseNet.forward`` runs anything else (SyncBatchNorm across processes, other
norms, hooks, edited ``features``), and empty batches and torch.func transforms as the blocks do
(``block.unfused``), as modules.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activation, distributed
from .block import layer_types, norm_inputs, unfused
from .ops import bn_relu, bn_relu_backward, prelu
from .ops._autograd import bn_autograd
from .ops._norm_args import NormArgs
from .ops.bn_relu import bn_relu_reference
from .ops.layout import empty_like_layout, to_layout_of

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_MAX_POOL_WITH_INDICES = {
    2: (torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d_with_indices_backward),
    3: (torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.max_pool3d_with_indices_backward),
}


def _max_pool(z: Tensor) -> Tensor:
    """torchvision's pool0: max over windows of 3, stride 2, padding 1."""
    return _MAX_POOL[z.dim() - 2](z, kernel_size=3, stride=2, padding=1)


def _max_pool_backward(grad: Tensor, z: Tensor) -> Tensor:
    """The gradient of ``_max_pool`` for z, by the kernels autograd runs for it, with the indices recomputed."""
    d = z.dim() - 2
    if d == 1:  # F.max_pool1d runs as a 2-D pool over a unit height
        grad, z = grad.unsqueeze(-2), z.unsqueeze(-2)
        window, stride, padding = [1, 3], [1, 2], [0, 1]
    else:
        window, stride, padding = [3] * d, [2] * d, [1] * d
    forward, backward = _MAX_POOL_WITH_INDICES[z.dim() - 2]
    dilation = [1] * len(window)
    _, indices = forward(z, window, stride, padding, dilation, False)
    grad_z = backward(grad, z, window, stride, padding, dilation, False, indices)
    return grad_z.squeeze(-2) if d == 1 else grad_z


def global_avg_pool(z: Tensor, spatial_dims: int) -> Tensor:
    """[N, C]: the average of z [N, C, *spatial] over its spatial dims, as torchvision's head pools (the rank is
    given: torch.fx traces DenseNet's plain head with z a Proxy)."""
    return torch.flatten(_ADAPTIVE_AVG_POOL[spatial_dims](z, 1), 1)


def _spread_mean_backward(grad: Tensor, x: Tensor) -> Tensor:
    """The gradient of a global average over x's spatial dims for x: each value's share, in x's layout."""
    share = (grad / math.prod(x.shape[2:])).reshape(*grad.shape, *[1] * (x.dim() - 2))
    return empty_like_layout(x, x.size(1)).copy_(share.expand(x.shape))


def bn_relu_max_pool_reference(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """max_pool(relu(gamma * (x - mean) * invstd + beta)), windows of 3, stride 2, padding 1."""
    return _max_pool(bn_relu_reference(x, mean, invstd, gamma, beta))


def bn_relu_mean_reference(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """[N, C]: the global average of relu(gamma * (x - mean) * invstd + beta) per sample and channel."""
    return global_avg_pool(bn_relu_reference(x, mean, invstd, gamma, beta), x.dim() - 2)


@torch.library.custom_op("densenet_fused::bn_relu_max_pool", mutates_args=())
def bn_relu_max_pool(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, training: bool) -> Tensor:
    """The stem after conv0: ``bn_relu_max_pool_reference`` with the ``bn_relu`` primitive, in x's layout.

    ``training`` says mean/invstd are x's batch statistics (autograd only, as in the primitives).
    """
    return to_layout_of(_max_pool(bn_relu(x, mean, invstd, gamma, beta, training)), x)


@bn_relu_max_pool.register_fake
def _bn_relu_max_pool_fake(x, mean, invstd, gamma, beta, training):
    return empty_like_layout(x, x.size(1), spatial=[(s - 1) // 2 + 1 for s in x.shape[2:]])


def _bn_relu_max_pool_backward(grad, x, mean, invstd, gamma, beta, training):
    """(grad_x, grad_gamma, grad_beta), with relu(bn(x)) and the pool's indices recomputed from x."""
    grad_z = _max_pool_backward(grad, bn_relu(x, mean, invstd, gamma, beta, training))
    return bn_relu_backward(grad_z, x, mean, invstd, gamma, beta, training)


def bn_prelu_max_pool_reference(x, mean, invstd, gamma, beta, slope) -> Tensor:
    """max_pool(prelu(gamma * (x - mean) * invstd + beta, slope)), windows of 3, stride 2, padding 1."""
    return _max_pool(prelu.bn_prelu_reference(x, mean, invstd, gamma, beta, slope))


def _bn_prelu(x, mean, invstd, gamma, beta, slope, training) -> tuple[Tensor, Tensor, NormArgs, prelu.PReLUArgs]:
    """``ops.prelu.bn_prelu`` by the ``bn_relu`` primitive: (prelu(t), relu(-t)), and the norm and PReLU."""
    norm = NormArgs(mean, invstd, gamma, beta)
    (args,) = prelu.prelu_args([norm], [slope])
    return *prelu.bn_prelu(lambda x, norm: bn_relu(x, *norm[:4], training), x, norm, args), norm, args


@torch.library.custom_op("densenet_fused::bn_prelu_max_pool", mutates_args=())
def bn_prelu_max_pool(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, slope: Tensor,
                      training: bool) -> Tensor:  # fmt: skip
    """The stem after conv0 with a PReLU of weight ``slope``: ``bn_prelu_max_pool_reference`` with the
    ``bn_relu`` primitive (two calls), in x's layout."""
    return to_layout_of(_max_pool(_bn_prelu(x, mean, invstd, gamma, beta, slope, training)[0]), x)


@bn_prelu_max_pool.register_fake
def _bn_prelu_max_pool_fake(x, mean, invstd, gamma, beta, slope, training):
    return _bn_relu_max_pool_fake(x, mean, invstd, gamma, beta, training)


def _bn_prelu_max_pool_backward(grad, x, mean, invstd, gamma, beta, slope, training):
    """(grad_x, grad_gamma, grad_beta, grad_slope), with both halves of the PReLU and the pool's indices
    recomputed from x."""
    z, negative, norm, args = _bn_prelu(x, mean, invstd, gamma, beta, slope, training)
    grad_z = _max_pool_backward(grad, z)
    del z
    grad_slope = prelu.slope_grad(grad_z, negative, args.neg_slope)
    del negative
    backward = lambda grad, x, norm, training: bn_relu_backward(grad, x, *norm[:4], training)  # noqa: E731
    return *prelu.bn_prelu_backward(backward, grad_z, x, norm, args, training), grad_slope


@torch.library.custom_op("densenet_fused::bn_relu_mean", mutates_args=())
def bn_relu_mean(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, training: bool) -> Tensor:
    """The head before the classifier: ``bn_relu_mean_reference`` with the ``bn_relu`` primitive."""
    return global_avg_pool(bn_relu(x, mean, invstd, gamma, beta, training), x.dim() - 2)


@bn_relu_mean.register_fake
def _bn_relu_mean_fake(x, mean, invstd, gamma, beta, training):
    return x.new_empty(x.shape[:2])


def _bn_relu_mean_backward(grad, x, mean, invstd, gamma, beta, training):
    """(grad_x, grad_gamma, grad_beta), with the ReLU mask recomputed from x."""
    return bn_relu_backward(_spread_mean_backward(grad, x), x, mean, invstd, gamma, beta, training)


def _register_autograd(op, reference, kernel_backward) -> None:
    """The primitives' autograd (``bn_autograd``): ``kernel_backward``, or under create_graph=True ``reference``."""
    autograd = bn_autograd(reference, kernel_backward)
    op.register_autograd(autograd.backward, setup_context=autograd.setup_context)


_register_autograd(bn_relu_max_pool, bn_relu_max_pool_reference, _bn_relu_max_pool_backward)
_register_autograd(bn_relu_mean, bn_relu_mean_reference, _bn_relu_mean_backward)
_register_autograd(bn_prelu_max_pool, bn_prelu_max_pool_reference, _bn_prelu_max_pool_backward)


def norm_relu_max_pool(x: Tensor, norm: nn.Module, act: nn.Module | None = None) -> Tensor:
    """``pool0(relu0(norm0(x)))`` on conv0's output x, relu0 (``act``) a ReLU (None too) or a PReLU; backward
    saves x, the statistics and the parameters only."""
    stats, training, _ = norm_inputs(norm, x, "DenseNet stem")  # fused only unsynchronized (``fusable``)
    slope = activation.slope_of(act, norm)
    if slope is None:
        return bn_relu_max_pool(x, *stats, training)
    return bn_prelu_max_pool(x, *stats, slope.to(stats[0].dtype), training)


def norm_relu_mean(x: Tensor, norm: nn.Module, act: nn.Module | None = None) -> Tensor:
    """``flatten(adaptive_avg_pool(act(norm5(x)), 1), 1)`` on the last block's buffer x, ``act`` a PReLU or ReLU
    (None: ReLU, torchvision's F.relu); backward saves x, the statistics and the parameters only.  A PReLU's
    average is that of its two halves (``ops.prelu``)."""
    stats, training, _ = norm_inputs(norm, x, "DenseNet head")
    out = bn_relu_mean(x, *stats, training)
    slope = activation.slope_of(act, norm)
    if slope is None:
        return out
    mean, invstd, gamma, beta = stats
    return out - slope.to(out.dtype) * bn_relu_mean(x, mean, invstd, -gamma, -beta, training)


def fusable(features: nn.Module, spatial_dims: int, head_act: nn.Module | None = None) -> tuple[bool, bool]:
    """(stem, head): whether ``features[1:4]`` (norm0, relu0, pool0) and ``features[-1]`` (norm5) with
    ``head_act`` (the head's activation module, None for torchvision's F.relu) can run fused.

    Only the modules torchvision (or MONAI) builds qualify (a BatchNorm or InstanceNorm of that rank, or a
    SyncBatchNorm computing this process's statistics; nn.ReLU or nn.PReLU; pool0's max pool), and only where
    calling them, and ``features``, would run nothing but their forward (``unfused.runs_plain``); hooks keeping
    an end from being fused warn once, as in the blocks.
    """
    if type(features) is not nn.Sequential:
        return False, False
    modules, types = list(features), layer_types(spatial_dims)
    stem = len(modules) >= 4 and _is_norm(modules[1], types) and type(modules[2]) in activation.FUSED
    stem = stem and _is_pool0(modules[3], types.max_pool)
    head_act_fused = head_act is None or type(head_act) in activation.FUSED
    head = len(modules) > 0 and _is_norm(modules[-1], types) and head_act_fused
    plain = unfused.runs_plain
    hooked_stem = stem and not (plain(features) and all(map(plain, modules[1:4])))
    hooked_head = head and not (plain(features) and plain(modules[-1]) and (head_act is None or plain(head_act)))
    if hooked_stem or hooked_head:
        unfused.warn_once(features, "DenseNet.features (its stem and head)")
    return stem and not hooked_stem, head and not hooked_head


def _is_norm(norm: nn.Module, types) -> bool:
    norms = (types.norm, types.instance_norm, nn.SyncBatchNorm)
    return type(norm) in norms and distributed.sync_group(norm) is None


def _is_pool0(pool: nn.Module, pool_type: type) -> bool:
    if type(pool) is not pool_type:
        return False
    geometry = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, pool.return_indices)
    return geometry == (3, 2, 1, 1, False, False)

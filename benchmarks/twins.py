"""A densenet_fused model and a torchvision twin with the same weights, and their errors against the float64
truth: what the tests judge float32 numerics by, and what gpu_check.py reports on a GPU."""

import copy

import torch
import torchvision

import densenet_fused


def twins(dtype=torch.float64, seed=0, norm_kwargs=None, **config):
    """(ours, torchvision) built from the same config and holding the same weights.

    ``norm_kwargs`` rebuilds every BatchNorm2d of both with those arguments (momentum, eps, affine, ...).
    """
    torch.manual_seed(seed)
    ours = densenet_fused.DenseNet(**config)
    theirs = torchvision.models.DenseNet(**{**config, "memory_efficient": False})
    if norm_kwargs:
        _replace_norms(ours, norm_kwargs), _replace_norms(theirs, norm_kwargs)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _replace_norms(model, norm_kwargs):
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.BatchNorm2d(child.num_features, **norm_kwargs))


def randomize_affine(model):
    """Non-trivial BatchNorm (and InstanceNorm) weights and biases (uniform around 1 and 0), and PReLU slopes
    (uniform in [-1, 1]: negative ones too, which no max pool commutes with), so their gradients are checked too."""
    for module in model.modules():
        if isinstance(module, densenet_fused.norm.NORMS) and module.affine:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
        elif type(module) is torch.nn.PReLU:
            torch.nn.init.uniform_(module.weight, -1.0, 1.0)
    return model


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _flat(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors])


def step_results(model, x, loss_fn, autocast=None) -> dict:
    """Output, input grad, param grads and running stats of one training step (forward under ``autocast``,
    the keyword arguments of torch.autocast, if given); the loss is taken in float64."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    with torch.autocast(**(autocast or dict(device_type=x.device.type)), enabled=autocast is not None):
        out = model(x)
    loss_fn(out.to(torch.float64)).backward()
    running = [b for name, b in model.named_buffers() if "running" in name]
    grads = [p.grad for p in model.parameters()]
    return {"output": out, "input grad": x.grad, "param grads": _flat(grads), "running stats": _flat(running)}


def errors_against_float64(ours, theirs, x, loss_fn, autocast=None) -> dict:
    """{quantity: (ours' error, torchvision's error)}, both relative to torchvision (``theirs``) in float64.

    ``ours`` and ``theirs`` hold the same weights; they run in their own dtype (under ``autocast`` if given),
    the truth is a float64 copy of ``theirs`` without autocast.
    """
    truth = step_results(copy.deepcopy(theirs).double(), x.double(), loss_fn)
    mine, peer = step_results(ours, x, loss_fn, autocast), step_results(theirs, x, loss_fn, autocast)
    return {what: (relative_error(mine[what], t), relative_error(peer[what], t)) for what, t in truth.items()}


# Two correct float32 implementations round differently: over 7 seeds of a small DenseNet, our median error
# against float64 was 0.9-1.26x torchvision's own, quantity by quantity.  A real bug is orders of magnitude off.
ROUNDING_SPREAD = 1.5

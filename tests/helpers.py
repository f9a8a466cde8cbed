"""Test helpers shared by the test files: model twins stepped in lockstep, float32 accuracy rules, tiny configs.

The twins and their errors against float64 live in ``benchmarks.twins``, which gpu_check.py reports from too.
"""

import statistics

import torch

from benchmarks.twins import (  # noqa: F401  (re-exported for the tests)
    ROUNDING_SPREAD,
    errors_against_float64,
    randomize_affine,
    relative_error,
    step_results,
    twins,
)


def train_step(model, x, target, lr=0.1):
    """One SGD step on a cross-entropy loss; returns (output, input grad, param grads)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, target)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return out.detach(), x.grad, grads


def assert_close_tensors(actual, expected, rtol, atol, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def assert_lockstep(ours, theirs, x, target, steps, rtol, atol, seed=None):
    """Train both for ``steps`` SGD steps, comparing everything each step, then compare in eval.

    With a ``seed``, both steps start from the same RNG state (the same dropout masks).
    """
    for step in range(steps):
        results = []
        for model in (ours, theirs):
            if seed is not None:
                torch.manual_seed(seed + step)
            results.append(train_step(model, x, target))
        (out, gx, grads), (out_t, gx_t, grads_t) = results
        torch.testing.assert_close(out, out_t, rtol=rtol, atol=atol, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(gx, gx_t, rtol=rtol, atol=atol, msg=lambda m: f"step {step} input grad: {m}")
        assert_close_tensors(grads, grads_t, rtol, atol, f"step {step} param grads")
        assert_close_tensors(
            list(ours.state_dict().values()), list(theirs.state_dict().values()), rtol, atol, f"step {step} state"
        )
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=rtol, atol=atol)


def assert_float32_as_accurate_as_torchvision(make, seeds=(0, 1, 2, 3, 4)):
    """Float32 is judged against the float64 truth: for every quantity of a training step, the median over
    ``seeds`` of our error must stay within ``ROUNDING_SPREAD`` of torchvision's own float32 error.

    ``make(seed)`` returns (ours, theirs, x, loss_fn), both models float32 with the same weights.
    """
    runs = [errors_against_float64(*make(seed)) for seed in seeds]
    for what in runs[0]:
        ours_error = statistics.median(run[what][0] for run in runs)
        theirs_error = statistics.median(run[what][1] for run in runs)
        assert ours_error <= ROUNDING_SPREAD * theirs_error, (
            f"{what}: ours {ours_error:.2e}, torchvision float32 {theirs_error:.2e}"
        )

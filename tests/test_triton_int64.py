"""The Triton kernels address memory beyond 2^31 elements: offsets are int64 wherever a coordinate times
a stride can leave the int32 range.

The tensors are ``as_strided`` views into one allocation of 2^32 + 1024 fp16 elements (8 GiB of address
space) of which only a few pages are ever written, so Linux commits only those.  A view is
[N, C, H, W] with its samples and channels packed within a row, a width stride WS and the height stride
S = 2^31 - 256, which Triton passes as an int32.  Two geometries:

* "rows":   H = 3 from offset 512: row 2 lies 2S ~ 2^32 past the base, and h * S in int32 wraps to
            -512, the start of the allocation;
* "window": H = W = 2, WS = 384 from offset 2^31: the last tap of the 2x2 pooling window, S + WS, wraps
            in int32 to -2^31 + 128, the start of the allocation again.

The start of the allocation and the elements of the views' rows that no view holds are sentinels.  Each
primitive runs on the views (through Triton's interpreter on CPU, or on the GPU), must match its
reference run on compact copies, accumulate into the gradient buffer at the right elements and leave
every sentinel alone.
"""

import importlib
import os

import pytest
import torch
from helpers import CUDA, DEVICE, OPS

from densenet_fused.ops import _triton as tr

bn_relu_mod = importlib.import_module("densenet_fused.ops.bn_relu")
conv_mod = importlib.import_module("densenet_fused.ops.bn_relu_conv1x1")
pool_mod = importlib.import_module("densenet_fused.ops.bn_relu_pool_conv1x1")
stats_mod = importlib.import_module("densenet_fused.ops.channel_stats")

pytestmark = pytest.mark.skipif(
    not tr.TRITON_AVAILABLE or not (CUDA or tr.interpreting()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 (set by conftest.py before triton is imported)",
)
# A kernel test: guarded by conftest.py (no reference fallback, a Triton kernel must run, fresh memory NaN).
TRITON = pytest.mark.parametrize("backend", ["triton"])

S = 2**31 - 256
LENGTH = 2**32 + 1024
WRAPPED = 512  # storage[:WRAPPED]: where the int32-wrapped offsets land
SLOT = 16  # elements per view in each (row, w): N * channels of them
N, C, B = 2, 3, 2
SENTINEL = 999.0
GEOMETRIES = {
    "rows": {"base": 512, "height": 3, "width": 2, "ws": 128},
    "window": {"base": 2**31, "height": 2, "width": 2, "ws": 384},
}


def resident_bytes():
    """This process's resident memory, or None where /proc is missing."""
    if not os.path.exists("/proc/self/statm"):
        return None
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.float16)


def bn_params():
    generator = torch.Generator().manual_seed(5)
    mean, invstd = 0.2 * torch.randn(C, generator=generator), 0.5 + torch.rand(C, generator=generator)
    gamma, beta = torch.randn(C, generator=generator), torch.randn(C, generator=generator)
    return [t.to(DEVICE) for t in (mean, invstd, gamma, beta)]


def close(got, want, what):
    """Equal up to fp16 rounding; an element read from a sentinel (999) or never written is far off."""
    atol = 1e-2 * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def storage():
    """(the large allocation, resident memory before it); skips where it cannot be had."""
    before = resident_bytes()
    try:
        return torch.empty(LENGTH, dtype=torch.float16, device=DEVICE), before
    except (MemoryError, RuntimeError) as error:
        pytest.skip(f"cannot allocate {LENGTH * 2 / 2**30:.0f} GiB of address space: {error}")


class Arena:
    """Views in one geometry of the storage, everything around them a sentinel."""

    def __init__(self, storage, resident, base, height, width, ws):
        self.storage, self.resident, self.base, self.spatial, self.ws = storage, resident, base, (height, width), ws
        self.windows = [(0, WRAPPED)] + [(base + h * S, base + h * S + width * ws) for h in range(height)]
        for start, end in self.windows:
            storage[start:end].fill_(SENTINEL)
        self.slots = 0

    def view(self, channels, seed):
        """A new [N, channels, H, W] view, random, in the next free slot of each row."""
        assert N * channels <= SLOT and (self.slots + 1) * SLOT <= self.ws
        shape = (N, channels, *self.spatial)
        view = self.storage.as_strided(shape, (channels, 1, S, self.ws), self.base + self.slots * SLOT)
        self.slots += 1
        return view.copy_(random(shape, seed))

    def snapshot(self):
        return [self.storage[start:end].clone() for start, end in self.windows]

    def assert_untouched(self, snapshot):
        """Every element of the windows is as in ``snapshot``, and the storage stayed virtual."""
        for (start, end), before in zip(self.windows, snapshot):
            changed = (self.storage[start:end] != before).nonzero().flatten() + start
            assert changed.numel() == 0, f"wrote storage elements {changed.tolist()}, outside the outputs"
        if self.resident is not None and not CUDA:
            grown = resident_bytes() - self.resident
            assert grown < 2**28, f"resident memory grew by {grown / 2**20:.0f} MiB: the storage was touched"


@pytest.fixture(params=list(GEOMETRIES))
def arena(request, storage):
    return Arena(*storage, **GEOMETRIES[request.param])


@TRITON
def test_channel_stats(backend, arena):
    x = arena.view(C, seed=0)
    before = arena.snapshot()
    got = stats_mod.channel_stats_triton(x)
    arena.assert_untouched(before)
    for name, g, w in zip(("mean", "var"), got, OPS["channel_stats"].reference(x.contiguous())):
        close(g, w, name)


@TRITON
def test_bn_relu_forward(backend, arena):
    x = arena.view(C, seed=0)
    params = bn_params()
    before = arena.snapshot()
    got = bn_relu_mod.bn_relu_triton(x, *params)
    arena.assert_untouched(before)
    close(got, OPS["bn_relu"].reference(x.contiguous(), *params), "out")


@TRITON
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_backward(backend, arena, training):
    x, grad_z = arena.view(C, seed=0), arena.view(C, seed=1)
    params = bn_params()
    before = arena.snapshot()
    got = bn_relu_mod.bn_relu_backward_triton(grad_z, x, *params, training)
    arena.assert_untouched(before)
    want = OPS["bn_relu_backward"].reference(grad_z.contiguous(), x.contiguous(), *params, training)
    for name, g, w in zip(("grad_x", "grad_gamma", "grad_beta"), got, want):
        close(g, w, name)


@pytest.mark.parametrize("name", ["bn_relu_conv1x1", "bn_relu_pool_conv1x1"])
@TRITON
def test_conv1x1_forwards(backend, arena, name):
    launcher = {"bn_relu_conv1x1": conv_mod.bn_relu_conv1x1_triton, "bn_relu_pool_conv1x1": pool_mod.bn_relu_pool_conv1x1_triton}
    x = arena.view(C, seed=0)
    params, weight = bn_params(), random((B, C), seed=3)
    before = arena.snapshot()
    got = launcher[name](x, *params, weight)
    arena.assert_untouched(before)
    close(got, OPS[name].reference(x.contiguous(), *params, weight), "out")


@TRITON
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_conv1x1_backward_accumulates_in_place(backend, arena, training):
    x, grad_y, grad_buffer = arena.view(C, seed=0), arena.view(B, seed=1), arena.view(C + 1, seed=2)
    params, weight = bn_params(), random((B, C), seed=3)
    expected = grad_buffer.contiguous().clone()
    before = arena.snapshot()
    got = conv_mod.bn_relu_conv1x1_backward_triton(grad_y, x, *params, weight, grad_buffer, training)
    accumulated = grad_buffer.clone()
    grad_buffer[:, :C].copy_(expected[:, :C])  # the elements the kernel writes; all else must be as before
    arena.assert_untouched(before)
    want = OPS["bn_relu_conv1x1_backward"].reference(grad_y.contiguous(), x.contiguous(), *params, weight, expected, training)
    for name, g, w in zip(("grad_weight", "grad_gamma", "grad_beta"), got, want):
        close(g, w, name)
    close(accumulated, expected, "grad_buffer")


@TRITON
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_pool_conv1x1_backward(backend, arena, training):
    x = arena.view(C, seed=0)
    params, weight = bn_params(), random((B, C), seed=3)
    grad_y = random((N, B, *(size // 2 for size in x.shape[2:])), seed=4)
    before = arena.snapshot()
    got = pool_mod.bn_relu_pool_conv1x1_backward_triton(grad_y, x, *params, weight, training)
    arena.assert_untouched(before)
    want = OPS["bn_relu_pool_conv1x1_backward"].reference(grad_y, x.contiguous(), *params, weight, training)
    for name, g, w in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), got, want):
        close(g, w, name)


def test_runs_triton_refuses_more_pixels_than_int32_tiles():
    """Pixel indices, tile ends and chunk ends are int32 in the kernels: ``runs_triton`` refuses more than
    MAX_PIXELS pixels, so the launchers run the reference (a stride-0 tensor of that size, never allocated)."""
    x = torch.empty(1, 1, 1, dtype=torch.float16).expand(1, 2, tr.MAX_PIXELS + 1)
    assert tr.runs_triton(x[..., :-1]) and not tr.runs_triton(x)

"""The implementations compared (the model zoo), the shapes they run at, where they run, and their input.

Every implementation gets the same weights (torchvision's init, copied by ``state_dict``) and the same
input, so any difference in memory or time comes from the implementation alone.
"""

import copy
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

import densenet_fused

MiB = 2**20

# The implementations compared, in table order; the first is the baseline every ratio is taken against.
IMPLS = {
    "tv_naive": "torchvision naive",
    "tv_ckpt": "torchvision checkpoint",
    "tv_compile": "torch.compile(torchvision)",
    "fused_eff": "fused memory_efficient=True",
    "fused_keep": "fused memory_efficient=False",
    "fused_eff_compile": "torch.compile(fused memory_efficient=True)",
    "fused_keep_compile": "torch.compile(fused memory_efficient=False)",
    "fused_eff_graphs": 'torch.compile(fused memory_efficient=True, mode="reduce-overhead")',
    "tv_graphs": 'torch.compile(torchvision, mode="reduce-overhead")',
}
BASELINE = "tv_naive"
# The compiled implementations: torch.compile of the eager one named.
COMPILED = {
    "tv_compile": "tv_naive",
    "fused_eff_compile": "fused_eff",
    "fused_keep_compile": "fused_keep",
    "fused_eff_graphs": "fused_eff",
    "tv_graphs": "tv_naive",
}
# torch.compile's mode where it is not the default: "reduce-overhead" replays each compiled graph from a CUDA
# graph (inductor only). memory.py and speed.py leave these out: gpu_check.py times them.
COMPILE_MODES = {"fused_eff_graphs": "reduce-overhead", "tv_graphs": "reduce-overhead"}
EAGER_IMPLS = [key for key in IMPLS if key not in COMPILED]

# ImageNet DenseNets: (growth_rate, block_config, num_init_features), as in torchvision.
ARCHS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Arch:
    """A DenseNet-BC shape: ImageNet ones by name, or the CIFAR k=12 ones by depth (``bc<depth>``)."""

    name: str
    growth_rate: int
    block_config: tuple
    num_init_features: int
    num_classes: int
    depth: int | None = None  # CIFAR nets only: densenet_bc(depth), with its 3x3 stem

    @property
    def kwargs(self) -> dict:
        return dict(
            growth_rate=self.growth_rate,
            block_config=self.block_config,
            num_init_features=self.num_init_features,
            num_classes=self.num_classes,
        )


def named_arch(name: str) -> Arch:
    """``densenet121`` etc., or ``bc<depth>``: ``densenet_bc(depth)``, the CIFAR DenseNet-BC k=12 of Huang et
    al. and Pleiss et al.: a 3x3 conv stem, then three blocks of (depth-4)/6 layers at 32x32, 16x16, 8x8."""
    if name in ARCHS:
        growth, blocks, init = ARCHS[name]
        return Arch(name, growth, blocks, init, 1000)
    if name.startswith("bc") and name[2:].isdigit():
        depth = int(name[2:])
        n = (depth - 4) // 6
        if n < 1 or bc_depth(n) != depth:
            raise ValueError(f"bc<depth> needs a depth 6n + 4 (40, 100, 190, ...), got {name!r}")
        return Arch(name, 12, (n, n, n), 24, 10, depth)
    raise ValueError(f"unknown model {name!r}: one of {sorted(ARCHS)} or bc<depth> (e.g. bc100)")


def bc_depth(layers_per_block: int) -> int:
    return 6 * layers_per_block + 4


@dataclass
class Setup:
    """Where and how the models run: device, dtype, memory format, autocast dtype (None: no AMP)."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    amp: torch.dtype | None

    @classmethod
    def from_args(cls, args) -> "Setup":
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        amp = None
        if args.amp:
            amp = torch.float16 if device.type == "cuda" else torch.bfloat16
        return cls(device, DTYPES[args.dtype], args.channels_last, amp)

    def describe(self) -> str:
        parts = [self.device.type, str(self.dtype).replace("torch.", "")]
        if self.channels_last:
            parts.append("channels_last")
        if self.amp is not None:
            parts.append(f"AMP {str(self.amp).replace('torch.', '')}")
        return ", ".join(parts)

    def place(self, module_or_tensor):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return module_or_tensor.to(device=self.device, dtype=self.dtype, memory_format=fmt)


def build_models(a: Arch, impls, setup: Setup, seed: int = 0, backend: str = "inductor") -> dict:
    """One model per implementation, all with the weights torchvision's init gives for ``seed``; the
    ``COMPILED`` ones are ``compiled(...)`` copies of their eager model."""
    torch.manual_seed(seed)
    naive = setup.place(torchvision_model(a, memory_efficient=False))
    state = naive.state_dict()
    models = {}
    for key in impls:
        eager = COMPILED.get(key, key)
        if eager == "tv_naive":
            model = naive
        else:
            build = torchvision_model if eager == "tv_ckpt" else fused_model
            model = setup.place(build(a, memory_efficient=eager in ("tv_ckpt", "fused_eff")))
            model.load_state_dict(state)
        if key in COMPILED:
            model = compiled(copy.deepcopy(model), key, backend)
        models[key] = model.train()
    return models


def compiled(model: nn.Module, key: str, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` of ``model`` as implementation ``key`` compiles it: with its ``COMPILE_MODES`` mode
    when the backend is inductor (the only one with modes), else with ``backend`` alone."""
    mode = COMPILE_MODES.get(key)
    if mode is not None and backend == "inductor":
        return torch.compile(model, mode=mode)
    return torch.compile(model, backend=backend)


def torchvision_model(a: Arch, memory_efficient: bool) -> nn.Module:
    """torchvision's DenseNet; for a CIFAR net, with densenet_bc's stem (conv0 3x3 alone, torchvision's init)."""
    model = torchvision.models.DenseNet(**a.kwargs, memory_efficient=memory_efficient)
    if a.depth is not None:
        model.features.conv0 = nn.Conv2d(3, a.num_init_features, kernel_size=3, padding=1, bias=False)
        nn.init.kaiming_normal_(model.features.conv0.weight)
        del model.features.norm0, model.features.relu0, model.features.pool0
    return model


def fused_model(a: Arch, memory_efficient: bool) -> nn.Module:
    """densenet_fused's DenseNet for ``a``: ``densenet_bc`` for a CIFAR net."""
    if a.depth is not None:
        return densenet_fused.densenet_bc(a.depth, a.growth_rate, memory_efficient=memory_efficient)
    return densenet_fused.DenseNet(**a.kwargs, memory_efficient=memory_efficient)


def make_batch(a: Arch, batch: int, size: int, setup: Setup, seed: int = 1):
    """The input images and class targets every implementation is fed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, a.num_classes, (batch,), generator=gen)
    return setup.place(x), target.to(setup.device)

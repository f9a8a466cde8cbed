"""Activation memory per model, batch, size and implementation, each measured once and cached."""

import torch

from .accounting import activation_bytes, held_bytes
from .models import COMPILED, IMPLS, Arch, Setup, build_models, make_batch
from .report import short_error


class Measurer:
    """Activation memory per (model, batch, size, implementation), measured once and cached.

    Models of one architecture are built once (same weights for every implementation) and reused
    for every batch size. A failing measurement is recorded (and printed at the end) as None, so one
    failure does not stop the run.
    """

    def __init__(self, setup: Setup, progress=None):
        self.setup, self.progress = setup, progress
        self.models, self.cache, self.errors = {}, {}, []

    def model(self, arch: Arch, key: str):
        if (arch.name, key) not in self.models:
            self.models.update({(arch.name, k): m for k, m in build_models(arch, [key], self.setup).items()})
        return self.models[(arch.name, key)]

    def drop(self, arch: Arch):
        for name, key in list(self.models):
            if name == arch.name:
                del self.models[(name, key)]

    def activation(self, arch: Arch, batch: int, size: int, key: str):
        """Activation bytes of one step, or None (error recorded) when the implementation fails."""
        cache_key = (arch.name, batch, size, key)
        if cache_key not in self.cache:
            try:
                model = self.model(arch, key)
                x, target = make_batch(arch, batch, size, self.setup)
                warmup = key in COMPILED or self.setup.device.type == "cuda"
                self.cache[cache_key] = activation_bytes(model, x, target, self.setup.amp, warmup=warmup)
            except torch.OutOfMemoryError:  # on CUDA: does not fit, which a search expects
                self.cache[cache_key] = None
                torch.cuda.empty_cache()
            except Exception as error:
                self.cache[cache_key] = None
                where = f"{IMPLS[key]} on {arch.name}, batch {batch}, {size}x{size}"
                self.errors.append(f"{where}: {short_error(error)}")
            if self.progress is not None:
                self.progress.update(1)
        return self.cache[cache_key]

    def total(self, arch: Arch, batch: int, size: int, key: str):
        """Everything one step holds at its peak: params, buffers, grads, the batch, activations."""
        act = self.activation(arch, batch, size, key)
        if act is None:
            return float("inf")
        x, target = make_batch(arch, batch, size, self.setup)
        return held_bytes(self.model(arch, key), x, target) + act

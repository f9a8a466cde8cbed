"""What a fused kernel normalizes with, as the block and the primitives hand it over."""

import functools
import struct
from typing import NamedTuple, Optional

import torch


class NormArgs(NamedTuple):
    """What a kernel normalizes with: mean, ``invstd`` (or, with ``eps``, the biased variance), gamma, beta."""

    mean: torch.Tensor
    invstd: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: Optional[float] = None

    @classmethod
    def of(cls, mean, invstd, gamma, beta) -> "NormArgs":
        """A primitive op's (mean, invstd, gamma, beta), made contiguous for the kernels' flat loads."""
        return cls(mean.contiguous(), invstd.contiguous(), gamma.contiguous(), beta.contiguous())

    def with_invstd(self, dtype: torch.dtype) -> "NormArgs":
        """The same normalization as (mean, invstd, gamma, beta) in ``dtype``, for kernels that take invstd."""
        if self.eps is None:
            return self
        mean, var = (t if t.dtype == dtype else t.to(dtype) for t in self[:2])
        return NormArgs(mean, torch.rsqrt(var + self.eps), self.gamma, self.beta)

    def kernel_args(self) -> tuple:
        """((mean, invstd or var, gamma, beta), (eps_hi, eps_lo), the ``VAR`` constexpr): eps as two float32
        scalars whose sum is float64-exact (Triton passes Python floats as float32)."""
        return self[:4], _split_eps(0.0 if self.eps is None else self.eps), self.eps is not None


@functools.lru_cache(maxsize=None)
def _split_eps(eps: float) -> tuple[float, float]:
    """(hi, lo), both representable in float32, with hi + lo == eps to float64 precision."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi

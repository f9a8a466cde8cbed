"""Builds densenet_fused._C: the C++ CPU kernels, plus any CUDA sources when a CUDA toolkit is usable.

The GPU kernels are Triton (compiled at run time), so a CPU-only machine builds everything it needs.
Set FORCE_CUDA=1 to build CUDA sources without a visible GPU (as torchvision does).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and CUDA_HOME is not None and (
        torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"
    )
    # -fno-trapping-math (as torch itself builds): lets the compiler vectorize the branch-free ReLU masks
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    if use_cuda:
        return CUDAExtension(
            "densenet_fused._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DWITH_CUDA"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return CppExtension(
        "densenet_fused._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    name="densenet_fused",
    version="0.1.0",
    description="Memory-efficient, fused DenseNet blocks: a drop-in replacement for torchvision's DenseNet",
    packages=find_packages(include=["densenet_fused", "densenet_fused.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch", "torchvision"],
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)

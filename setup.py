"""Builds densenet_fused._C: the C++ CPU kernels (csrc/*.cpp).

The GPU kernels are Triton (compiled at run time), so there are no CUDA sources and every machine
builds the same CPU extension.

_C registers its ops with the dispatcher (TORCH_LIBRARY) and its module init uses only the stable
Python ABI, so it is built against the limited API (py_limited_api=True: torch's BuildExtension then
defines Py_LIMITED_API for its minimum CPython, 3.10, and skips libtorch_python) and the wheel is tagged
abi3 from cp310, matching python_requires.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def extension():
    # -fno-trapping-math (as torch itself builds): lets the compiler vectorize the branch-free ReLU masks
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
    return CppExtension(
        "densenet_fused._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
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
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

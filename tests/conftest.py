"""Shared test setup.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
switched on before anything imports triton (densenet_fused does, and so do torch._dynamo/_inductor).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

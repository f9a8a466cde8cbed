"""The benchmarks of densenet_fused: three scripts and the small library they share.

Scripts (run from the repository root, e.g. ``python benchmarks/memory.py``, or as ``python -m benchmarks.memory``):

- ``memory.py``: activation memory, step time, max batch and max depth against torchvision;
- ``speed.py``: training-step and inference time against torchvision;
- ``gpu_check.py``: one prepared, time-boxed check for a lent GPU (``--dry-run`` on CPU).

Library, one job per module:

- ``models``: the implementations compared (model zoo), shapes, device/dtype setup and the input batch;
- ``steps``: one training step, one eval step, and their FLOPs;
- ``accounting``: exact activation-memory accounting of a step;
- ``measurer``: activation memory per model, batch and implementation, measured once and cached;
- ``timing``: interleaved step timing, host time, CUDA-graph replay, kernel launches per step;
- ``search``: the largest batch (or depth) that fits a memory budget;
- ``flags``: torch's float32 precision flags and densenet_fused's backend, set for a block of code;
- ``twins``: a fused model and its torchvision twin, and their errors against a float64 truth;
- ``primitives``: the fused primitives' inputs at DenseNet shapes, and their errors against the reference;
- ``sections``: time-limited report sections (gpu_check's frame);
- ``cli``: the command line and run header of memory.py and speed.py;
- ``report``: environment facts, tables, JSON and CSV.

Importing any of them sets no environment variables; the scripts set what they need in ``main()``.
"""

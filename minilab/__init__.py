"""minilab: fine-tune language models as text classifiers, in plain PyTorch."""

import os

__version__ = "0.1.0"

# Why this line: on the CPU, PyTorch's bf16 matmuls run through oneDNN, which builds (JIT-compiles) a
# kernel for every new matrix shape and keeps the last 1024 in a cache. Texts of varying lengths give
# every batch new shapes (a DPO run meets thousands), so with the default the cache fills after a few
# dozen steps and the loop rebuilds kernels it has already built. What that costs depends on the CPU:
# on one AMX Xeon here a kernel took about 17 ms to build and steam's DPO steps slowed from 4 to 2.5
# pairs/s after step 40; on another, about 1 ms, and the 400 steps took 4% longer. A larger cache
# gives the same numbers bit for bit. oneDNN reads the variable when it builds its first kernel, so
# it is set here, on `import minilab`, which every entry point does before its first matmul
# (tests/test_onednn_cache.py checks that it arrives in time after `import torch`). A value you
# export yourself wins, under either of oneDNN's names (it reads ONEDNN_ before DNNL_).
if not any(v in os.environ for v in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")):
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "16384"


def __getattr__(name):  # `from minilab import load_classifier`, without importing torch for `import minilab`
    if name == "load_classifier":
        from .predict import load_classifier

        return load_classifier
    raise AttributeError(name)

"""minilab: fine-tune language models as text classifiers, in plain PyTorch."""

import os

__version__ = "0.1.0"

# Why this line: on the CPU, PyTorch's bf16 matmuls run through oneDNN, which builds (JIT-compiles) a
# kernel for every new matrix shape, about 17 ms each on an AMX Xeon, and keeps the last 1024 in a cache.
# Texts of varying lengths give every batch new shapes (the DPO loop meets thousands), so with the
# default the cache fills after a few dozen steps and the loop spends its time rebuilding kernels it
# has already built: steam's DPO steps slowed from 4 to 2.5 pairs/s. A larger cache gives the same
# numbers bit for bit, faster, and lower peak memory (the rebuilt kernels churn the allocator).
# oneDNN reads the variable when it makes its first kernel, so it is set here, on `import minilab`,
# which every entry point does before its first matmul. A value you export yourself wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")


def __getattr__(name):  # `from minilab import load_classifier`, without importing torch for `import minilab`
    if name == "load_classifier":
        from .predict import load_classifier

        return load_classifier
    raise AttributeError(name)

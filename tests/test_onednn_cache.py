"""`import minilab` enlarges oneDNN's kernel cache, and oneDNN really reads it at that point.

The CPU's bf16 matmuls go through oneDNN, which builds a kernel per matrix shape and keeps the last
1024 (its default). Each test runs a fresh Python, because oneDNN reads the capacity once, when it
builds its first kernel: 1100 distinct small shapes between two calls of the same shape, then
oneDNN's own verbose log says whether that last call found its kernel in the cache (`cache_hit`) or
built it again (`cache_miss`). Small shapes build in about 0.2 ms, so a test takes a few seconds
(the very smallest, under about 17 rows of 16, skip oneDNN, so the probe uses 32 x 32 and up).
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO

VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"

# torch is imported before minilab, as the scripts do: the setting must still arrive in time.
PROBE = """
import torch
import minilab
import os
print("capacity", os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), flush=True)
w = torch.ones(32, 32, dtype=torch.bfloat16)
torch.ones(32, 32, dtype=torch.bfloat16) @ w              # shape A: built, cached
for m in range(33, 1133):                                 # 1100 other shapes: more than the default 1024
    torch.ones(m, 32, dtype=torch.bfloat16) @ w
torch.ones(32, 32, dtype=torch.bfloat16) @ w              # shape A again
"""


def last_lookup(env_value: str | None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env["ONEDNN_VERBOSE"] = "profile_create"
    if env_value is not None:
        env[VAR] = env_value
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = (p.stdout + p.stderr).splitlines()     # oneDNN's log and Python's prints are buffered apart
    capacity = next(ln.split()[1] for ln in lines if ln.startswith("capacity "))
    creates = [ln for ln in lines if ",create:" in ln and ",matmul," in ln]
    if not creates:
        pytest.skip("this CPU's bf16 matmul does not go through oneDNN (no oneDNN matmul in its verbose log)")
    shape_a = [ln for ln in creates if ",32x32:32x32," in ln]
    assert len(shape_a) == 2, shape_a                # shape A's two calls, in order
    return capacity, shape_a[1].split(",create:")[1].split(",")[0]


def test_import_minilab_sets_a_cache_that_holds_more_than_1024_shapes():
    capacity, lookup = last_lookup(None)
    assert capacity == "16384"
    assert lookup == "cache_hit"


def test_a_capacity_the_user_exported_wins():
    # The same probe with the default capacity written out: the first kernel has been evicted.
    capacity, lookup = last_lookup("1024")
    assert capacity == "1024"
    assert lookup == "cache_miss"


def test_the_older_name_of_the_variable_is_respected_too():
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env["DNNL_PRIMITIVE_CACHE_CAPACITY"] = "1024"
    p = subprocess.run([sys.executable, "-c", "import os, minilab; print(os.environ.get('%s'))" % VAR],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "None", p.stderr[-2000:]  # minilab left it to the user's DNNL_ value

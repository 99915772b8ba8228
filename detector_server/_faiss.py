"""The one import of faiss in the runtime: `from ._faiss import faiss`, never `import faiss`.

libgomp (FAISS's OpenMP runtime) reads `OMP_WAIT_POLICY` once, when faiss loads it. The runtime
wants PASSIVE: by default libgomp spins for milliseconds after every parallel region, on the very
cores the next model call and the server's event loop need (measured: 64-image batches 27-30 ->
24-25 ms, KNN CPU time for 8 queries 6.6 -> 1.7 ms). So whichever runtime module is imported
first (bundle, knn, runtime, detector), faiss is loaded here, with PASSIVE set unless the
environment already says otherwise. The variable is removed again right after, so OpenMP runtimes
loaded later (PyTorch's own libgomp in the same process, child processes) keep their defaults:
PyTorch eager at batch 1 is 2x slower with PASSIVE.
If faiss was already imported before the runtime (a training script that imports it first), the
policy cannot change any more; `WAIT_POLICY` then says so.
Test: tests/runtime/test_runtime_faiss.py.
"""
from __future__ import annotations

import os
import sys

__all__ = ["faiss", "WAIT_POLICY"]

_USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
_LOADED_BEFORE = "faiss" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import faiss
finally:
    if _USER_WAIT_POLICY is None:
        del os.environ["OMP_WAIT_POLICY"]

# What FAISS's OpenMP pool does after a search, for the runtime's log line.
WAIT_POLICY = (_USER_WAIT_POLICY or "default (faiss was loaded before detector_server)"
               if _LOADED_BEFORE else _USER_WAIT_POLICY or "PASSIVE")

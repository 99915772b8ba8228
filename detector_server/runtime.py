"""Execution-provider and thread selection for ONNX Runtime and FAISS (used by `Detector`).

Use `open_session(path, device, threads)` to get an ONNX Runtime session on CUDA when asked for
and available, else on CPU, and `set_faiss_threads(threads)` before FAISS searches.

Thread policy (why ONNX Runtime and FAISS do not oversubscribe the cores): a `Detector` call runs
the model and then the KNN search, one after the other, never at the same time. So each gets the
same budget of T threads (default: the cores this process may run on, `os.sched_getaffinity`):
- ONNX Runtime: `intra_op_num_threads = T`, `inter_op_num_threads = 1` (sequential executor), and
  spinning off (`session.intra_op.allow_spinning = 0`), so its pool sleeps the moment the model
  finishes instead of busy-waiting on the cores the FAISS search needs next.
- FAISS: `faiss.omp_set_num_threads(T)` on the thread that searches (`bind_faiss_threads`, called
  by every `Detector.score_arrays`): OpenMP keeps the count per calling thread, so setting it once
  where the Detector was built would not reach the server's batch thread. FAISS's OpenMP pool
  also sleeps as soon as a search ends (`OMP_WAIT_POLICY=PASSIVE`, see `detector_server._faiss`,
  the runtime's one import of faiss).
Callers that run several Detector calls at once (they should not need to: the server's batcher
runs one batch at a time) should divide the cores between them with `threads=`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from ._faiss import WAIT_POLICY, faiss
from .errors import BundleError, InputError
from .validate import check_int

__all__ = ["DEVICES", "available_cores", "resolve_threads", "select_providers", "session_options",
           "open_session", "set_faiss_threads", "bind_faiss_threads", "faiss_gpu_count"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")       # plus "cuda:N" for a given GPU
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup-aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`threads` validated, or `available_cores()` when None. Raises InputError naming `threads`."""
    if threads is None:
        return available_cores()
    return check_int(threads, "threads", minimum=1)


def _parse_device(device: str) -> tuple[str, int]:
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    if device not in DEVICES:
        raise InputError(f"expected one of {DEVICES} or 'cuda:N', got {device!r}", field="device")
    return device, 0


def select_providers(device: str) -> list:
    """ONNX Runtime providers for `device`: CUDA then CPU when CUDA is wanted and present.

    "auto" takes CUDA when onnxruntime-gpu sees a GPU, else CPU; "cuda" without it raises
    InputError naming `device`; "cpu" is always CPU.
    """
    kind, gpu = _parse_device(device)
    has_cuda = CUDA_EP in ort.get_available_providers()
    if kind == "cuda" and not has_cuda:
        raise InputError("CUDA requested but onnxruntime has no CUDAExecutionProvider "
                         "(install onnxruntime-gpu, or use device 'cpu')", field="device")
    if kind == "cpu" or not has_cuda:
        return [CPU_EP]
    return [(CUDA_EP, {"device_id": gpu}), CPU_EP]


def session_options(threads: int) -> ort.SessionOptions:
    """Session options for the thread policy in the module docstring."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
    return opts


def open_session(path: str | Path, device: str, threads: int) -> tuple[ort.InferenceSession, str]:
    """Open `path` on `device`; returns (session, "cuda" or "cpu", the device it really runs on).

    ONNX Runtime silently falls back to CPU when the CUDA provider cannot load its libraries;
    that fallback is logged for "auto" and refused (InputError) for an explicit "cuda".
    Raises BundleError naming `path` when the model cannot be loaded.
    """
    providers = select_providers(device)
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # onnxruntime's own exception types
        raise BundleError(f"ONNX Runtime cannot load the model: {str(e)[:300]}",
                          path=path) from None
    used = "cuda" if session.get_providers()[0] == CUDA_EP else "cpu"
    wanted_cuda = providers[0] != CPU_EP
    if wanted_cuda and used != "cuda":
        if _parse_device(device)[0] == "cuda":
            raise InputError("CUDAExecutionProvider failed to initialise (see onnxruntime's log)",
                             field="device")
        log.warning("onnxruntime: CUDA provider present but unusable, running on CPU")
    log.info("onnxruntime %s on %s (providers %s, %d intra-op threads)", ort.__version__,
             used, session.get_providers(), threads)
    return session, used


def faiss_gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def set_faiss_threads(threads: int) -> None:
    """Set FAISS's OpenMP thread count for the calling thread, and log it (see the module docstring)."""
    faiss.omp_set_num_threads(threads)
    log.info("faiss %s: %d OpenMP threads, wait policy %s", faiss.__version__, threads,
             WAIT_POLICY)


def bind_faiss_threads(threads: int) -> None:
    """Use `threads` OpenMP threads for FAISS searches made from the calling thread (~1 us, no log)."""
    faiss.omp_set_num_threads(threads)

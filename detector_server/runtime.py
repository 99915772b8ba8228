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
runs one batch at a time) should divide the cores between them with `threads=`; `rwood-serve
--workers N` gives each worker process its share.

Device policy: "cpu" is always CPU. "auto" uses CUDA when onnxruntime-gpu is installed and the host
has an NVIDIA driver, and says so when CUDA then fails (it falls back to CPU with a warning naming
the cause). "cuda"/"cuda:N" never falls back: no CUDA provider, no driver, a driver too old for the
build, or CUDA libraries that do not load each raise InputError with the fix (see `cuda`). The
FAISS index follows the model onto the GPU when faiss has GPU support (`faiss_device`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from . import cuda
from ._faiss import WAIT_POLICY, faiss
from .errors import BundleError, InputError
from .validate import check_int

__all__ = ["DEVICES", "cgroup_cpu_limit", "available_cores", "resolve_threads", "select_providers",
           "session_options", "open_session", "set_faiss_threads", "bind_faiss_threads",
           "faiss_gpu_count", "faiss_device"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")       # plus "cuda:N" for a given GPU
CUDA_EP, CPU_EP = cuda.CUDA_EP, "CPUExecutionProvider"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")    # cgroup v2: "<quota> <period>" or "max <period>"


def cgroup_cpu_limit(path: Path | None = None) -> int | None:
    """Whole cores allowed by a cgroup v2 CPU quota (a container's CPU limit, rounded up), or None
    when there is no quota or no cgroup v2 file. `path` defaults to CGROUP_CPU_MAX."""
    try:
        quota, period = Path(path or CGROUP_CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, -(-int(quota) // int(period)))


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU limit (a pod with
    `limits.cpu: 4` on a 64-core node sees 64 cores in its affinity mask, but gets 4)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return cores if limit is None else min(cores, limit)


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
    """ONNX Runtime providers for `device` (see the module docstring's device policy).

    "cpu" -> CPU; "auto" -> CUDA then CPU when `cuda.cuda_precheck()` finds nothing in the way,
    else CPU (logged); "cuda"/"cuda:N" -> CUDA (device N) then CPU, or InputError naming `device`
    with the reason and the fix (CPU-only onnxruntime, no driver, driver too old).
    """
    kind, gpu = _parse_device(device)
    if kind == "cpu":
        return [CPU_EP]
    reason = cuda.cuda_precheck()
    if reason is not None:
        if kind == "cuda":
            raise InputError(f"CUDA requested but {reason}", field="device")
        if CUDA_EP in ort.get_available_providers():   # a GPU build on a host it cannot use
            log.warning("device auto: running on CPU because %s", reason)
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

    Before a CUDA session the CUDA libraries are loaded from the nvidia-* wheels
    (`cuda.prepare_cuda`). ONNX Runtime silently falls back to CPU when its CUDA provider cannot
    start; that fallback is logged with its cause for "auto" and refused (InputError naming
    `device`, with the cause and the fix) for an explicit "cuda". Raises BundleError naming `path`
    when the model cannot be loaded.
    """
    providers = select_providers(device)
    wanted_cuda = providers[0] != CPU_EP
    if wanted_cuda:
        cuda.prepare_cuda()
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # onnxruntime's own exception types
        raise BundleError(f"ONNX Runtime cannot load the model: {str(e)[:300]}",
                          path=path) from None
    used = "cuda" if session.get_providers()[0] == CUDA_EP else "cpu"
    if wanted_cuda and used != "cuda":
        reason = cuda.cuda_problem()
        if _parse_device(device)[0] == "cuda":
            raise InputError(f"CUDA requested but the CUDA provider did not start: {reason}",
                             field="device")
        log.warning("onnxruntime: CUDA provider present but unusable, running on CPU: %s", reason)
    log.info("onnxruntime %s on %s (providers %s, %d intra-op threads)", ort.__version__,
             used, session.get_providers(), threads)
    return session, used


def faiss_gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def faiss_device(device: str, model_device: str) -> str:
    """Where the FAISS index goes, for a model asked on `device` that runs on `model_device`
    ("cuda"/"cpu", from `open_session`): "cuda:N" (the model's GPU) when the model runs on CUDA
    and faiss has GPU support, else "cpu", with a warning when the model is on CUDA (the KNN search
    then runs on the CPU)."""
    if model_device != "cuda":
        return "cpu"
    if faiss_gpu_count() > 0:
        return f"cuda:{_parse_device(device)[1]}"
    log.warning("faiss %s sees no GPU (faiss-cpu installed? the [gpu] extra installs faiss-gpu): "
                "the KNN search runs on the CPU", faiss.__version__)
    return "cpu"


def set_faiss_threads(threads: int) -> None:
    """Set FAISS's OpenMP thread count for the calling thread, and log it (see the module docstring)."""
    faiss.omp_set_num_threads(threads)
    log.info("faiss %s: %d OpenMP threads, wait policy %s", faiss.__version__, threads,
             WAIT_POLICY)


def bind_faiss_threads(threads: int) -> None:
    """Use `threads` OpenMP threads for FAISS searches made from the calling thread (~1 us, no log)."""
    faiss.omp_set_num_threads(threads)

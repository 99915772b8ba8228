"""ONNX Runtime's CUDA provider from pip wheels alone, and a message that names the fix when it fails.

Use `cuda_precheck()` before choosing CUDA (it says what stands in the way: no CUDA build, no
driver, a driver too old), `prepare_cuda()` once before the first CUDA session
(`runtime.open_session` does both), and `cuda_problem()` to explain a CUDA session that fell back
to CPU.

Why this exists: onnxruntime-gpu's CUDA provider (`libonnxruntime_providers_cuda.so`) needs the
CUDA runtime, cuBLAS, cuRAND, cuFFT and cuDNN. The `[gpu]` extra installs them as NVIDIA's wheels
(`onnxruntime-gpu[cuda,cudnn]`), which sit in site-packages/nvidia, off the dynamic loader's
search path; `onnxruntime.preload_dlls()` loads them from there. Only the driver (`libcuda.so.1`)
comes from the host. When anything is missing ONNX Runtime logs one error and quietly runs on
CPU; `runtime.open_session` refuses that quiet fallback for an explicit "cuda".
Driver versions: a CUDA 13 build of onnxruntime-gpu needs driver >= 580.65.06, a CUDA 12 build
>= 525.60.13 (NVIDIA's minimums for the major version; see `MIN_DRIVER`).
Test: tests/runtime/test_runtime_providers.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import threading
from importlib import metadata

import onnxruntime as ort

__all__ = ["MIN_DRIVER", "CUDA_EP", "ort_cuda_version", "driver_cuda_version", "prepare_cuda",
           "cuda_precheck", "cuda_problem"]

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
# Oldest Linux driver for each CUDA major version (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}

_lock = threading.Lock()
_preload_problems: list[str] | None = None


def ort_cuda_version() -> str:
    """The CUDA version this onnxruntime was built for ("13.0"), "" for a CPU-only build."""
    return str(getattr(ort, "cuda_version", "") or "")


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the newest CUDA the host's driver supports, or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def prepare_cuda() -> list[str]:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels (`onnxruntime.preload_dlls`),
    once per process, before a CUDA session is created. Returns what could not be loaded
    (empty when all loaded, or when this onnxruntime has no CUDA build)."""
    global _preload_problems
    with _lock:
        if _preload_problems is None:
            _preload_problems = []
            if ort_cuda_version() and hasattr(ort, "preload_dlls"):
                out = io.StringIO()
                with contextlib.redirect_stdout(out):   # preload_dlls prints what it cannot load
                    ort.preload_dlls()
                _preload_problems = [line.strip() for line in out.getvalue().splitlines()
                                     if line.startswith("Failed to load")]
            for problem in _preload_problems:
                log.warning("onnxruntime CUDA libraries: %s", problem)
        return list(_preload_problems)


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def cuda_precheck() -> str | None:
    """Why CUDA cannot work here, as far as can be told without trying (no CUDA build of
    onnxruntime, no driver, a driver older than the build), as one sentence naming the fix;
    None when nothing stands in the way."""
    ort_name = f"onnxruntime {ort.__version__}"
    if CUDA_EP not in ort.get_available_providers():
        if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
            return (f"both onnxruntime and onnxruntime-gpu are installed and overwrite each other "
                    f"({ort_name} has no CUDA provider): pip uninstall -y onnxruntime "
                    f"onnxruntime-gpu, then pip install 'reweightood[gpu]'")
        return (f"{ort_name} is the CPU-only build: install 'reweightood[gpu]' "
                f"(onnxruntime-gpu) instead of the [cpu] extra")
    driver = driver_cuda_version()
    if driver is None:
        return ("no NVIDIA driver: libcuda.so.1 cannot be loaded (no GPU, or a container started "
                "without the NVIDIA container toolkit / an nvidia.com/gpu resource)")
    built = ort_cuda_version()
    major = built.split(".")[0]
    if major.isdigit() and driver[0] < int(major):
        return (f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} but onnxruntime-gpu "
                f"{ort.__version__} is built for CUDA {built}: update the driver to >= "
                f"{MIN_DRIVER.get(int(major), 'the CUDA ' + major + ' minimum')}")
    return None


def cuda_problem() -> str:
    """Why a CUDA session did not start: `cuda_precheck`'s reason, else the libraries that did not
    load, else a pointer to ONNX Runtime's own error."""
    reason = cuda_precheck()
    if reason is not None:
        return reason
    problems = prepare_cuda()
    if problems:
        return (f"CUDA libraries missing ({'; '.join(problems)}): pip install "
                f"'onnxruntime-gpu[cuda,cudnn]=={ort.__version__}' (the [gpu] extra does)")
    return (f"ONNX Runtime's CUDA provider failed to initialise (onnxruntime {ort.__version__} "
            f"built for CUDA {ort_cuda_version()}; see its error above)")

"""Device and provider selection (detector_server.runtime, detector_server.cuda) without a GPU.

ONNX Runtime's GPU build, the driver and the CUDA session are replaced by stand-ins (the
attributes `runtime` and `cuda` read), so every branch of the policy runs here: "cpu" never
touches CUDA, "auto" falls back with the reason, "cuda" fails loudly naming the fix, the CUDA
libraries are preloaded once before the first CUDA session. The last tests use the real,
CPU-only onnxruntime of this environment.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import onnxruntime as ort
import pytest

from detector_server import cuda, runtime
from detector_server.errors import InputError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class FakeSession:
    """Stands in for ort.InferenceSession: records what it was asked, runs on `runs_on`."""

    created: list[list] = []
    runs_on: list[str] = [CPU]

    def __init__(self, path: str, options: ort.SessionOptions, providers: list) -> None:
        FakeSession.created.append(providers)

    def get_providers(self) -> list[str]:
        return list(FakeSession.runs_on)


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> dict:
    """onnxruntime-gpu built for CUDA 13.0 on a host whose driver supports CUDA 13.0; tests
    change `state` to take the driver away, age it, or make libraries fail to load."""
    state = {"driver": (13, 0), "preloads": 0, "preload_output": ""}

    def preload_dlls() -> None:
        state["preloads"] += 1
        print(state["preload_output"], end="")

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(cuda, "ort_cuda_version", lambda: "13.0")
    monkeypatch.setattr(cuda, "driver_cuda_version", lambda: state["driver"])
    monkeypatch.setattr(cuda, "_preload_problems", None)
    FakeSession.created, FakeSession.runs_on = [], [CUDA, CPU]
    return state


@pytest.fixture
def cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    monkeypatch.setattr(cuda, "_installed", lambda name: name == "onnxruntime")


# ---- select_providers ---------------------------------------------------------------------------
def test_cpu_is_cpu_even_with_a_gpu(gpu_build: dict) -> None:
    assert runtime.select_providers("cpu") == [CPU]


def test_auto_and_cuda_take_the_gpu_when_everything_is_there(gpu_build: dict) -> None:
    assert runtime.select_providers("auto") == [(CUDA, {"device_id": 0}), CPU]
    assert runtime.select_providers("cuda") == [(CUDA, {"device_id": 0}), CPU]
    assert runtime.select_providers("cuda:2") == [(CUDA, {"device_id": 2}), CPU]


def test_auto_runs_on_cpu_without_a_driver_and_says_why(gpu_build: dict, caplog) -> None:
    gpu_build["driver"] = None
    with caplog.at_level(logging.WARNING, logger="detector_server.runtime"):
        assert runtime.select_providers("auto") == [CPU]
    assert "no NVIDIA driver" in caplog.text


def test_auto_with_the_cpu_build_is_cpu_quietly(cpu_build: None, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert runtime.select_providers("auto") == [CPU]
    assert caplog.text == ""


def test_cuda_with_the_cpu_build_names_the_gpu_extra(cpu_build: None) -> None:
    with pytest.raises(InputError, match=r"field 'device'.*CPU-only build.*reweightood\[gpu\]"):
        runtime.select_providers("cuda")


def test_cuda_with_both_onnxruntime_packages_says_to_keep_one(cpu_build: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_installed", lambda name: True)
    with pytest.raises(InputError, match="overwrite each other.*pip uninstall -y onnxruntime"):
        runtime.select_providers("cuda")


def test_cuda_without_a_driver_fails_loudly(gpu_build: dict) -> None:
    gpu_build["driver"] = None
    with pytest.raises(InputError, match="field 'device'.*no NVIDIA driver.*libcuda.so.1"):
        runtime.select_providers("cuda")


def test_cuda_with_a_driver_too_old_for_the_build_names_the_driver_to_install(gpu_build: dict) -> None:
    gpu_build["driver"] = (12, 4)
    with pytest.raises(InputError, match=r"supports CUDA 12.4.*built for CUDA 13.0.*>= 580.65.06"):
        runtime.select_providers("cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "", None])
def test_unknown_device_refused(device: object) -> None:
    with pytest.raises(InputError, match="field 'device'"):
        runtime.select_providers(device)  # type: ignore[arg-type]


# ---- open_session -------------------------------------------------------------------------------
def test_cuda_session_preloads_the_wheel_libraries_once_first(gpu_build: dict) -> None:
    for _ in range(2):
        session, used = runtime.open_session("model.onnx", "cuda", threads=2)
        assert used == "cuda"
    assert gpu_build["preloads"] == 1
    assert FakeSession.created == [[(CUDA, {"device_id": 0}), CPU]] * 2


def test_cpu_session_loads_no_cuda_library(gpu_build: dict) -> None:
    FakeSession.runs_on = [CPU]
    assert runtime.open_session("model.onnx", "cpu", threads=2)[1] == "cpu"
    assert gpu_build["preloads"] == 0 and FakeSession.created == [[CPU]]


def test_cuda_session_that_falls_back_fails_loudly_with_the_missing_library(gpu_build: dict) -> None:
    gpu_build["preload_output"] = ("Failed to load /site-packages/nvidia/cudnn/lib/libcudnn.so.9: "
                                   "cannot open shared object file\n")
    FakeSession.runs_on = [CPU]              # what onnxruntime does when its CUDA provider fails
    with pytest.raises(InputError, match=r"did not start: CUDA libraries missing \(Failed to load "
                                         r".*libcudnn.so.9.*onnxruntime-gpu\[cuda,cudnn\]"):
        runtime.open_session("model.onnx", "cuda", threads=2)


def test_cuda_session_failing_for_another_reason_points_at_onnxruntimes_error(gpu_build: dict) -> None:
    FakeSession.runs_on = [CPU]
    with pytest.raises(InputError, match="failed to initialise.*built for CUDA 13.0"):
        runtime.open_session("model.onnx", "cuda:0", threads=2)


def test_auto_session_that_falls_back_runs_on_cpu_with_a_warning(gpu_build: dict, caplog) -> None:
    FakeSession.runs_on = [CPU]
    with caplog.at_level(logging.WARNING, logger="detector_server.runtime"):
        assert runtime.open_session("model.onnx", "auto", threads=2)[1] == "cpu"
    assert "CUDA provider present but unusable" in caplog.text


def test_cuda_with_the_real_cpu_only_onnxruntime_is_refused(tiny_bundle: Path) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(InputError, match="CPU-only build"):
        runtime.open_session(tiny_bundle / "model.onnx", "cuda", threads=1)
    session, used = runtime.open_session(tiny_bundle / "model.onnx", "auto", threads=1)
    assert used == "cpu" and session.get_providers() == [CPU]


# ---- the driver and the FAISS device ------------------------------------------------------------
def test_driver_version_read_through_the_driver_api(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeLibcuda:
        @staticmethod
        def cuDriverGetVersion(ref) -> int:   # noqa: N802 - the CUDA driver API's name
            ref._obj.value = 12040
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    assert cuda.driver_cuda_version() == (12, 4)

    def no_driver(name: str):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert cuda.driver_cuda_version() is None


def test_faiss_index_follows_the_model_to_its_gpu(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    assert runtime.faiss_device("cuda", "cpu") == "cpu"
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 2)
    assert runtime.faiss_device("cuda:1", "cuda") == "cuda:1"
    assert runtime.faiss_device("auto", "cuda") == "cuda:0"
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="detector_server.runtime"):
        assert runtime.faiss_device("cuda", "cuda") == "cpu"
    assert "faiss-gpu" in caplog.text


# ---- cores ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, cores", [("max 100000\n", None), ("400000 100000\n", 4),
                                         ("150000 100000\n", 2), ("50000 100000\n", 1),
                                         ("garbage\n", None)])
def test_cgroup_cpu_limit(tmp_path: Path, text: str, cores: int | None) -> None:
    (tmp_path / "cpu.max").write_text(text)
    assert runtime.cgroup_cpu_limit(tmp_path / "cpu.max") == cores


def test_available_cores_capped_by_the_container_limit(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.cgroup_cpu_limit(tmp_path / "absent") is None
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert runtime.available_cores() == 64
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert runtime.available_cores() == 4

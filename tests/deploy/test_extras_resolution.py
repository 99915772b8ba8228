"""What `pip install "reweightood[cpu]"` / `"reweightood[gpu]"` would install, resolved against the
package index with `pip install --dry-run --report` (slow: asks the index; installs nothing).

[gpu] must bring onnxruntime-gpu with the wheels of its `cuda` and `cudnn` extras (the CUDA
runtime, cuBLAS, cuDNN: what the CUDA provider loads, so the host needs only the driver) and
faiss-gpu with its CUDA runtime wheels; [cpu] the CPU builds and no NVIDIA wheel; neither the
other build of either library, nor torch.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.slow


def resolve(extra: str, tmp_path: Path) -> dict[str, dict]:
    """{package name: its metadata} of everything pip would install for `.[extra]`."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{REPO}[{extra}]"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {i["metadata"]["name"].lower(): i["metadata"]
            for i in json.loads(report.read_text())["install"]}


def deps_for(metadata: dict, extra: str | None) -> set[str]:
    """Names of the requirements of `metadata` that apply without extras, or with `extra` only."""
    out = set()
    for text in metadata.get("requires_dist") or []:
        req = Requirement(text)
        env = {"extra": extra or ""}
        in_extra = req.marker is not None and "extra" in str(req.marker)
        if (extra is None) != in_extra and (req.marker is None or req.marker.evaluate(env)):
            out.add(req.name.lower())
    return out


def test_gpu_extra_resolves_to_cuda_providers_loadable_from_wheels(tmp_path: Path) -> None:
    got = resolve("gpu", tmp_path)
    assert "reweightood" in got
    assert {"onnxruntime", "faiss-cpu", "torch", "torchvision"}.isdisjoint(got)
    ort = got["onnxruntime-gpu"]
    assert Version(ort["version"]) >= Version("1.21")           # onnxruntime.preload_dlls
    for extra in ("cuda", "cudnn"):
        wheels = deps_for(ort, extra)
        assert wheels and wheels <= set(got), f"onnxruntime-gpu[{extra}] wheels missing"
    assert any(name.startswith("nvidia-cudnn-cu") for name in got)
    assert any(name.startswith("nvidia-cublas") for name in got)
    faiss = got["faiss-gpu"]
    assert Version(faiss["version"]) >= Version("1.15.1")
    cuda_wheels = {n for n in deps_for(faiss, None) if n.startswith("nvidia-")}
    assert cuda_wheels and cuda_wheels <= set(got)


def test_cpu_extra_resolves_to_cpu_builds_only(tmp_path: Path) -> None:
    got = resolve("cpu", tmp_path)
    assert {"reweightood", "onnxruntime", "faiss-cpu"} <= set(got)
    assert {"onnxruntime-gpu", "faiss-gpu", "torch", "torchvision"}.isdisjoint(got)
    assert not [name for name in got if name.startswith("nvidia-")]

"""rwood-export killed with SIGKILL mid-write: no half-written bundle, and a later export succeeds.

The export stages every file in a hidden `.NAME.staging-*` directory and renames it into place
(detector_server.bundle.write_bundle), so at any kill point `--out` is either absent, the old
whole bundle, or the new whole bundle; never a directory that fails `load_bundle` half-way.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hostile_corpus import PYTHON, subprocess_env

from detector_server.bundle import MANIFEST_FILE, load_bundle
from detector_server.errors import BundleError

pytestmark = pytest.mark.timeout(600)

EXPORT = [PYTHON, "-c", "from exporter.cli import export_main; export_main()"]
# The same, holding for a minute once the staged manifest.json is written: the publish that
# follows takes microseconds, too short for the test to see the manifest and kill in between.
EXPORT_HELD_AT_MANIFEST = [PYTHON, "-c", """
import time
import detector_server.bundle as bundle
write = bundle.write_json_atomic
def held(path, *args, **kwargs):
    written = write(path, *args, **kwargs)
    if str(path).endswith("manifest.json"):
        time.sleep(60)
    return written
bundle.write_json_atomic = held
from exporter.cli import export_main; export_main()
"""]


def _start_export(run_dir: Path, out: Path, *extra: str, hold: bool = False) -> subprocess.Popen:
    return subprocess.Popen([*(EXPORT_HELD_AT_MANIFEST if hold else EXPORT), str(run_dir),
                             "--out", str(out), "--k", "10", *extra],
                            env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _staged_files(out: Path) -> list[Path]:
    return [f for d in out.parent.glob(f".{out.name}.staging-*") for f in d.iterdir()]


def test_export_killed_mid_write_leaves_no_bundle(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    proc = _start_export(tiny_run, out)
    try:
        t_end = time.monotonic() + 300
        while not _staged_files(out):               # the ONNX file is being written
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < t_end
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not out.exists()
    with pytest.raises(BundleError, match="not found"):
        load_bundle(out)
    leftovers = list(tmp_path.glob(".bundle.staging-*"))
    assert leftovers and not any((d / MANIFEST_FILE).exists() for d in leftovers)

    from exporter.export import export_bundle

    export_bundle(tiny_run, out, k=10, threads=1)   # a later export succeeds beside the leftover
    assert load_bundle(out).manifest.k == 10


_PHASES = {  # kill point -> the file that shows the export reached it
    "staging": lambda out: list(out.parent.glob(f".{out.name}.staging-*")),
    "index": lambda out: list(out.parent.glob(f".{out.name}.staging-*/index.faiss")),
    "labels": lambda out: list(out.parent.glob(f".{out.name}.staging-*/labels.npy")),
    "manifest": lambda out: list(out.parent.glob(f".{out.name}.staging-*/manifest.json*")),
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(_PHASES))
def test_forced_export_killed_keeps_a_whole_bundle(tiny_run, tiny_bundle, tmp_path, phase):
    """Replacing an existing bundle (--force), killed as it reaches each phase: `--out` is still a
    whole bundle (the old one) and a later export replaces it. The manifest phase holds the
    export once its manifest is staged, the last step before the publish (one exchange of the
    two directories where the system has it, so `--out` is never missing)."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    old = (out / MANIFEST_FILE).read_bytes()
    proc = _start_export(tiny_run, out, "--force", "--tpr", "0.9", hold=phase == "manifest")
    try:
        t_end = time.monotonic() + 300
        while not _PHASES[phase](out):
            assert proc.poll() is None, f"finished before {phase}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < t_end
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert (out / MANIFEST_FILE).read_bytes() == old
    assert load_bundle(out).manifest.threshold.target_tpr == 0.95

    from exporter.export import export_bundle

    export_bundle(tiny_run, out, k=10, tpr=0.9, overwrite=True, threads=1)
    assert load_bundle(out).manifest.threshold.target_tpr == 0.9

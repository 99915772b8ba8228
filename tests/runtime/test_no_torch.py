"""detector_server never imports torch, torchvision, trainer or exporter (DESIGN section 3).

A subprocess installs a meta-path finder that makes those imports fail, imports every module of
detector_server, loads the tiny bundle and scores an image, then checks none of them got loaded.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "torchvision", "trainer", "exporter")

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {{name}} in the torch-free runtime")
            return None

    sys.meta_path.insert(0, Block())
    import detector_server
    names = [m.name for m in pkgutil.walk_packages(detector_server.__path__, "detector_server.")]
    for name in names:
        importlib.import_module(name)
    from detector_server import Detector, load_bundle
    import numpy as np
    det = Detector(load_bundle(sys.argv[1]), device="cpu", threads=1)
    res = det.score_arrays(np.zeros((2, det.spec.size, det.spec.size, 3), np.uint8))
    assert len(res) == 2
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("OK", len(names))
""").format(blocked=BLOCKED)


def test_runtime_imports_no_torch(tiny_bundle: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
    n = int(proc.stdout.split()[1])
    assert n >= 8  # bundle, detector, runtime, knn, metrics, preprocess, errors, cli_common, ...


def test_blocker_really_blocks() -> None:
    """The guard itself: importing torch under the finder fails (so the test above can fail)."""
    script = SCRIPT.split("sys.meta_path.insert(0, Block())")[0] + \
        "sys.meta_path.insert(0, Block())\nimport torch\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "blocked import of torch" in proc.stderr

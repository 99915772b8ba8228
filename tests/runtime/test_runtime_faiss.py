"""faiss reaches the runtime through one shim that sets libgomp's wait policy before it loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Records OMP_WAIT_POLICY at the moment faiss is first imported, whoever imports it.
PROBE = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "faiss" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
import importlib
importlib.import_module(sys.argv[1])
print("PROBE", seen[0] if seen else "not imported", os.environ.get("OMP_WAIT_POLICY"))
"""


def _probe(stdout: str) -> tuple[str, str]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("PROBE "))
    _, at_import, after = line.split()
    return at_import, after


# Every runtime module that loads faiss when imported; rwood-score used to reach faiss through
# detector_server.bundle first, before the policy was set.
@pytest.mark.parametrize("module", ["detector_server.bundle", "detector_server.knn",
                                    "detector_server.runtime", "detector_server.detector"])
def test_faiss_loads_passive_whatever_is_imported_first(module):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    at_import, after = _probe(out.stdout)
    assert at_import == "PASSIVE"
    assert after == "None"          # removed again for OpenMP runtimes loaded later


def test_user_policy_is_kept():
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", PROBE, "detector_server.bundle"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert _probe(out.stdout) == ("ACTIVE", "ACTIVE")


def test_runtime_modules_import_faiss_only_through_the_shim():
    offenders = [p.name for p in (REPO / "detector_server").rglob("*.py")
                 if p.name != "_faiss.py"
                 and any(line.strip() in ("import faiss",) or line.startswith("import faiss")
                         for line in p.read_text().splitlines())]
    assert offenders == []

"""The top-level docs say what the build does: the README's install line names the extras the
Makefile installs (on a CPU machine, and with the gpu extra swapped in)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_names_the_extras_make_installs() -> None:
    match = re.search(r"^EXTRAS\s*\?=\s*(\S+)\s*$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile has no EXTRAS ?= line"
    extras = match.group(1)
    readme = (REPO / "README.md").read_text()
    assert f"installs `.[{extras}]`" in readme
    assert f"`EXTRAS={extras.replace('cpu', 'gpu')} make test`" in readme

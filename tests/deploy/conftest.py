"""Readers of the deployment files (deploy/): the Dockerfile's stages and the CLI arguments they
give rwood-serve, parsed by rwood-serve's own click command so a renamed flag fails here."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@dataclass
class Stage:
    """One `FROM ... AS name` stage: its instructions as (KEYWORD, text) in order."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [text for kw, text in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS"
                                else f"stage{len(stages)}", parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(text: str) -> list[str]:
    """A JSON-array instruction argument (CMD ["a", "b"]) as a list; fails on the shell form."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def serve_params(args: list[str]) -> dict[str, Any]:
    """rwood-serve's parameters for `args` (BUNDLE then flags), parsed by the real CLI."""
    from detector_server.serve_cli import serve_main

    ctx = serve_main.make_context("rwood-serve", list(args))
    return dict(ctx.params)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(scope="session")
def yaml_load():
    yaml = pytest.importorskip("yaml", reason="pyyaml (the dev extra) reads the deployment files")

    def load_all(path: Path) -> list[Any]:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]

    return load_all

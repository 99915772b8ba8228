"""Fixtures of the reliability tests: the hostile corpus, a Detector and a live server.

The corpus and its helpers live in hostile_corpus.py (also used by bench/fuzz.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hostile_corpus import HostileCase, build_hostile_corpus


@pytest.fixture(scope="session")
def hostile_corpus() -> list[HostileCase]:
    return build_hostile_corpus()


@pytest.fixture(scope="session")
def detector(tiny_bundle: Path):
    """An in-process Detector of the tiny bundle (CPU, one thread)."""
    from detector_server.detector import Detector

    return Detector(tiny_bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def live_server(tiny_bundle: Path):
    """A background server on a free loopback port, stopped at the end of the module."""
    from detector_server.server import start_background

    srv = start_background(tiny_bundle, device="cpu", threads=1, max_images=256)
    yield srv
    srv.stop(grace=0)

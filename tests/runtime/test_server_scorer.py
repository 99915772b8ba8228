"""rwood-serve reports its scorer (GetInfo), counts short queries (metric) and takes --search."""
from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ann_data import ivf_bundle
from click.testing import CliRunner
from PIL import Image

from detector_server.client import DetectorClient
from detector_server.errors import InputError
from detector_server.serve_cli import serve_main
from detector_server.serve_config import ServeConfig
from detector_server.server import start_background


@pytest.fixture(scope="module")
def short_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    """64 cells of ~15 rows searched with nprobe 1 at K = 100: every query short (export refuses
    such a bundle; a hand-made one shows what the runtime does with it)."""
    return ivf_bundle(tiny_bundle, tmp_path_factory.mktemp("short") / "b", "IVF64,Flat",
                      {"nprobe": 1}, k=100)


@pytest.fixture(scope="module")
def pngs(id_images: np.ndarray) -> list[bytes]:
    out = []
    for img in id_images[:4]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name + " "))


def test_get_info_reports_the_index_and_counts_short_queries(short_bundle: Path, pngs) -> None:
    srv = start_background(short_bundle, device="cpu", threads=1, metrics_port=0)
    try:
        with DetectorClient(srv.target) as client:
            s = client.info().scorer
            assert (s["scorer"], s["kind"], s["type"], s["factory"]) == (
                "knn", "ivf", "IndexIVFFlat", "IVF64,Flat")
            assert s["rows"] == 950 and s["bytes"] > 950 * 128 * 4 and s["device"] == "cpu"
            assert s["search_params"] == {"nprobe": 1} and s["short_queries"] == 0
            results = client.score(pngs)
            assert all(r.score == -2 and not r.error for r in results)
            s = client.info().scorer
            assert s["queries"] == s["short_queries"] == 4
        assert _metric(srv.metrics_port, "rwood_short_queries_total") == 4
    finally:
        srv.stop(grace=0)


def test_search_override_reaches_the_served_index(short_bundle: Path, pngs) -> None:
    srv = start_background(short_bundle, device="cpu", threads=1, search_params={"nprobe": 64})
    try:
        with DetectorClient(srv.target) as client:
            assert client.info().scorer["search_params"] == {"nprobe": 64}
            assert all(r.score > -2 for r in client.score(pngs))
            assert client.info().scorer["short_queries"] == 0
    finally:
        srv.stop(grace=0)


def test_serve_cli_refuses_a_malformed_search_flag(short_bundle: Path) -> None:
    res = CliRunner().invoke(serve_main, [str(short_bundle), "--search", "nprobe=many"])
    assert res.exit_code == 2 and "error: --search: expected NAME=INTEGER" in res.output
    # a name the index does not take is found when the bundle loads; the error names the flag
    res = CliRunner().invoke(serve_main, [str(short_bundle), "--search", "efSearch=5",
                                          "--address", "127.0.0.1:0", "--metrics-port", "0"])
    assert res.exit_code == 2 and res.output.startswith("error: --search: "), res.output


@pytest.mark.parametrize("given, fld", [(("nprobe",), "search_params"),
                                        (("nprobe=1", "nprobe=2"), "search_params"),
                                        (("nprobe=0",), "search_params.nprobe"),
                                        ({"nprobe": -1}, "search_params.nprobe")])
def test_serve_config_checks_search_params_under_its_own_name(given, fld) -> None:
    """ServeConfig takes --search's strings or a dict and names its own field, which rwood-serve
    turns into the flag (the CLI's option is the config field, as for every other option)."""
    with pytest.raises(InputError) as e:
        ServeConfig(search_params=given)
    assert e.value.field == fld
    assert ServeConfig(search_params=("nprobe=8",)).search_params == {"nprobe": 8}

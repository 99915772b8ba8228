"""Every metric the Grafana dashboard and the alert rules query is one `rwood-serve --workers 2`
really exports: the names are read from its /metrics after it has scored an image."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DEPLOY, REPO
from PIL import Image

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc

METRIC = re.compile(r"\b(rwood_[a-z0-9_]+)")


def queried_metrics(yaml_load) -> dict[str, set[str]]:
    """{where: metric names} for each dashboard panel and each alert rule."""
    dashboard = json.loads((DEPLOY / "grafana" / "reweightood.json").read_text())
    out = {f"panel {p['title']!r}": {m for t in p["targets"] for m in METRIC.findall(t["expr"])}
           for p in dashboard["panels"]}
    out["dashboard variables"] = {m for v in dashboard["templating"]["list"]
                                  for m in METRIC.findall(json.dumps(v.get("query", "")))}
    (rules,) = yaml_load(DEPLOY / "prometheus" / "alerts.yml")
    out.update({f"alert {r['alert']}": set(METRIC.findall(r["expr"]))
                for g in rules["groups"] for r in g["rules"]})
    return out


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, id_images: np.ndarray) -> set[str]:
    """Sample names on /metrics of a 2-worker server that has scored one image."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "detector_server.serve_cli", str(tiny_bundle),
                             "--address", "127.0.0.1:0", "--workers", "2", "--metrics-port", "0",
                             "--device", "cpu", "--threads", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        end, m = time.monotonic() + 120, None
        while m is None and time.monotonic() < end and proc.poll() is None:
            m = next((re.search(r"serving on [^:\s]+:(\d+), metrics on [^:\s]+:(\d+)", x)
                      for x in list(lines) if "serving on" in x), None)
            time.sleep(0.1)
        assert m, "".join(lines)[-3000:]
        buf = io.BytesIO()
        Image.fromarray(id_images[0]).save(buf, "PNG")
        with grpc.insecure_channel(f"127.0.0.1:{m.group(1)}") as channel:
            pb_grpc.DetectorStub(channel).Score(
                pb.ScoreRequest(images=[pb.Image(id="0", data=buf.getvalue())]), timeout=60)
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.group(2)}/metrics", timeout=10).read()
    finally:
        proc.terminate()
        proc.wait(60)
    return set(re.findall(r"^(rwood_[a-z0-9_]+)", text.decode(), re.M))


def test_every_queried_metric_is_exported(exported: set[str], yaml_load) -> None:
    queried = queried_metrics(yaml_load)
    assert sum(len(v) for v in queried.values()) >= 25
    missing = {where: sorted(names - exported) for where, names in queried.items() if names - exported}
    assert not missing, f"queried but not exported: {missing}"


def test_the_dashboard_shows_every_family_of_the_issue(yaml_load) -> None:
    queried = set().union(*queried_metrics(yaml_load).values())
    for family in ("rwood_requests_total", "rwood_request_latency_seconds_bucket",
                   "rwood_ood_decisions_total", "rwood_score_rank_bucket", "rwood_image_errors_total",
                   "rwood_batch_size_bucket", "rwood_model_info", "rwood_worker_restarts_total"):
        assert family in queried, family

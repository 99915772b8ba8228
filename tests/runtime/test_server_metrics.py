"""Server metrics in one process and across worker processes (prometheus-client multiprocess mode):
the supervisor's /metrics sums counters and histograms of every worker, counts live gauges of live
workers only, keeps one model version at 1, and adds its own metrics without duplicates."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from detector_server.server_metrics import RANK_BUCKETS, ServerMetrics, SupervisorMetrics


def samples(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(rwood_\S+) (\S+)$", text, re.M)}


def _worker(directory: str, version: str, n_ood: int, ranks: list[float], queue: int,
            done: "mp.synchronize.Event") -> None:
    """A worker process, started with PROMETHEUS_MULTIPROC_DIR in its environment (as the
    supervisor starts them), so prometheus_client writes its values to files there."""
    from detector_server.server_metrics import multiprocess_mode

    assert multiprocess_mode() and os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
    m = ServerMetrics(reloads=False)
    m.set_model("v0", 0.05)
    m.set_model(version, 0.04)
    m.requests.labels("Score", "OK").inc(3)
    m.ood_decisions.labels("ood").inc(n_ood)
    m.observe_ranks(version, np.array(ranks))
    m.serving.set(1)
    m.gauge_from(m.queue_images, lambda: queue)
    m.refresh()
    done.set()
    time.sleep(60)      # alive (its live gauges count) until the test kills it


def test_single_process_metrics_swap_the_model_version() -> None:
    m = ServerMetrics()
    m.set_model("v1", 0.05)
    m.set_model("v2", 0.04)
    m.gauge_from(m.queue_images, lambda: 7)
    m.observe_ranks("v2", np.array([0.0, 0.005, 0.5, 1.0]))
    got = samples(m.render().decode())
    assert got['rwood_model_info{model_version="v2"}'] == 1
    assert 'rwood_model_info{model_version="v1"}' not in got
    assert got['rwood_expected_ood_ratio{model_version="v2"}'] == 0.04
    assert got["rwood_queue_images"] == 7
    assert got['rwood_score_rank_bucket{le="0.01",model_version="v2"}'] == 2
    assert got['rwood_score_rank_bucket{le="0.5",model_version="v2"}'] == 3
    assert got['rwood_score_rank_count{model_version="v2"}'] == 4
    assert got['rwood_reloads_total{outcome="ok"}'] == 0
    assert [float(b) for b in RANK_BUCKETS][-1] == 1.0


def test_supervisor_sums_the_workers_and_forgets_dead_ones(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))   # inherited by the workers
    ctx = mp.get_context("spawn")
    procs, dones = [], []
    for version, n_ood, ranks, queue in (("v1", 2, [0.0, 0.2], 5), ("v1", 5, [0.005], 1)):
        done = ctx.Event()
        procs.append(ctx.Process(target=_worker, args=(str(tmp_path), version, n_ood, ranks,
                                                       queue, done)))
        dones.append(done)
        procs[-1].start()
    try:
        assert all(d.wait(60) for d in dones)
        sup = SupervisorMetrics(2, str(tmp_path))
        sup.restarts.inc()
        sup.reloads.labels("ok").inc()
        port = sup.start_http("127.0.0.1", 0)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        finally:
            sup.stop_http()
        got = samples(text.decode())
        assert got['rwood_requests_total{code="OK",method="Score"}'] == 6
        assert got['rwood_ood_decisions_total{decision="ood"}'] == 7
        assert got['rwood_score_rank_count{model_version="v1"}'] == 3
        assert got['rwood_score_rank_bucket{le="0.01",model_version="v1"}'] == 2
        assert got['rwood_model_info{model_version="v1"}'] == 1
        assert got['rwood_model_info{model_version="v0"}'] == 0      # served before, not now
        assert got["rwood_serving"] == 2 and got["rwood_queue_images"] == 6
        assert got["rwood_workers"] == 2 and got["rwood_worker_restarts_total"] == 1
        assert got['rwood_reloads_total{outcome="ok"}'] == 1
        assert text.decode().count("# TYPE rwood_reloads_total counter") == 1
        assert len(re.findall(r"^# TYPE (\S+)", text.decode(), re.M)) == len(
            set(re.findall(r"^# TYPE (\S+)", text.decode(), re.M)))
        procs[1].kill()
        procs[1].join(30)
        sup.mark_dead(procs[1].pid)
        got = samples(sup.render().decode())
        assert got["rwood_serving"] == 1 and got["rwood_queue_images"] == 5
        assert got['rwood_requests_total{code="OK",method="Score"}'] == 6   # counters keep counting
    finally:
        for p in procs:
            p.kill()
            p.join(30)


def test_workers_leave_reloads_to_the_supervisor() -> None:
    assert ServerMetrics(reloads=False).reloads is None
    with pytest.raises(AttributeError):
        ServerMetrics(reloads=False).reloads.labels("ok")  # type: ignore[union-attr]

"""bench/gpu_paper.sh and bench/paper_table.py: the GPU comparison run, in small on the CPU.

The dry run goes through every step of the GPU run (the wrapper's checks, the timing probe, the
epoch plan, four objectives, KNN and Mahalanobis on three OOD sets, the report folder) with
small_cnn, 500 real CIFAR-10 images and 1 epoch, so the script cannot rot unnoticed. The epoch
plan is checked on its own with the speeds the GPU run is sized for.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OBJECTIVES = ["reweightood", "unweighted", "supcon", "ce"]
OUT_FILES = {"report.md", "report.json", "run.log", "training.png", "score_histograms.png",
             "roc.png", "embedding_2d.png"}


@pytest.fixture
def paper_table(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("paper_table")


@pytest.mark.cifar_pack
def test_gpu_paper_dry_run_writes_a_compact_complete_report(tmp_path, shared_data):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "RWOOD_DATA": str(shared_data), "PYTHON": sys.executable,
           "RWOOD_WORK": str(work), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_paper.sh"), str(out), "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # what comes back from the GPU machine: a handful of small files, one folder
    files = {p.name for p in out.iterdir()}
    assert files == OUT_FILES, files
    assert sum(p.stat().st_size for p in out.iterdir()) < 4 * 2**20
    assert not list(out.glob("**/*.pt")) and not list(out.glob("**/*.npz"))
    assert "exit 0" in (out / "run.log").read_text()

    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "complete" and list(rep["objectives"]) == OBJECTIVES
    assert rep["k"] == 20 and "KNN+" in rep["k_reason"]
    plan = rep["plan"]
    assert plan["epochs"] == 1 and "capped at --max-epochs 1" in plan["why"]
    assert plan["probe"]["views_per_s"] > 0 and plan["probe"]["fixed_s"] > 0
    assert rep["recipe"]["preset"] == "official" and rep["recipe"]["arch"] == "small_cnn"
    for objective, entry in rep["objectives"].items():
        assert Path(entry["run_dir"]).name == objective
        assert entry["epochs"] == 1 and entry["views_per_s_median_epoch"] > 0
        assert Path(entry["run_dir"]).parent == work / "runs"
        for post in ("knn", "mahalanobis"):
            r = entry["reports"][post]
            assert r["settings"]["postprocessor"] == post
            assert r["settings"]["bank_size"] == 500     # official: every image banked, no split
            assert set(r["ood"]) == {"cifar100", "textures", "mnist"}
            for m in r["ood"].values():
                assert m["n"] == 100 and 0 <= m["fpr@95"] <= 1 and 0 <= m["auroc"] <= 1
        assert entry["reports"]["knn"]["settings"]["k"] == 20
        assert entry["knn_k100"]["k"] == 100 and set(entry["knn_k100"]["ood"]) == {
            "cifar100", "textures", "mnist"}
        assert math.isfinite(entry["final_loss"])
    # the probe was the reweightood run itself (same epochs): trained once, not twice
    assert rep["objectives"]["reweightood"]["train_seconds"] == plan["probe"]["train_s"]

    md = (out / "report.md").read_text()
    for text in ("Status: **complete**", "## OOD detection", "cifar100 FPR@95", "mean MES radius",
                 "## ReweightOOD minus the unweighted baseline", "## Training", "![roc](roc.png)"):
        assert text in md, text
    for objective in OBJECTIVES:
        assert f"| {objective} (knn) |" in md and f"| {objective} (mahalanobis) |" in md


def test_the_epoch_plan_fits_the_time_and_reaches_200_epochs_at_100k_views_per_s(paper_table):
    plan = paper_table.plan_epochs
    views = 9_500 // 512 * 512 * 2                                 # one 2-view epoch
    for rate, fixed, left in ((100_000, 15.0, 500.0), (56_400, 15.0, 500.0),
                              (100_000, 40.0, 450.0), (20_000, 15.0, 500.0)):
        epochs, why = plan(left, 4, fixed, views / rate, rate, 500)
        spent = 4 * (fixed + epochs * views / rate)
        assert spent <= left - paper_table.RESERVE_S, (rate, epochs, spent)
        assert epochs % 50 == 0 or epochs < 100, epochs
        assert f"{rate:,.0f} views/s" in why
        if rate >= 100_000:
            assert epochs >= 200, (rate, fixed, left, epochs)
    epochs, why = plan(500.0, 4, 15.0, views / 1e7, 1e7, 500)      # very fast: the cap
    assert epochs == 500 and "capped at --max-epochs 500" in why
    epochs, why = plan(60.0, 4, 15.0, 0.3, 60_000, 500)            # no time left: 1 anyway
    assert epochs == 1 and "too short" in why


def test_missing_data_fails_before_any_training(tmp_path, paper_table):
    opts = paper_table.Options(budget="gpu", out=tmp_path / "out", dry_run=True,
                               train_data=str(tmp_path / "absent.npz"))
    from detector_server.errors import DataError
    with pytest.raises(DataError) as e:
        paper_table.run_paper_table(opts)
    assert e.value.path == str(tmp_path / "absent.npz")
    assert not (tmp_path / "out" / "runs").exists()

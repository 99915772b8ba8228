"""rwood-export: help, argument pass-through, one-line errors with exit status 2."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import exporter.cli as cli


def test_help_lists_every_option() -> None:
    res = CliRunner().invoke(cli.export_main, ["--help"])
    assert res.exit_code == 0
    for opt in ("--out", "--feature", "--k", "--tpr", "--calibration", "--index", "--quantize",
                "--opset", "--force", "--scorer", "--search", "--min-recall", "--index-memory",
                "--check-ood"):
        assert opt in res.output


def test_flags_reach_export_bundle(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    def fake(run_dir, out, **kwargs):
        seen.update(run_dir=run_dir, out=out, **kwargs)
        return out

    monkeypatch.setattr(cli, "export_bundle", fake)
    res = CliRunner().invoke(cli.export_main, [
        "runs/x", "--out", str(tmp_path / "b"), "--feature", "projection", "--k", "7",
        "--tpr", "0.9", "--calibration", "cal.npz", "--index", "IVF16,Flat", "--quantize",
        "int8", "--opset", "19", "--force", "--threads", "1", "--search", "nprobe=4",
        "--min-recall", "0.95", "--index-memory", "512", "--check-ood", "a=x.npz",
        "--check-ood", "b=y"])
    assert res.exit_code == 0, res.output
    assert seen == dict(run_dir=Path("runs/x"), out=tmp_path / "b", feature="projection", k=7,
                        tpr=0.9, calibration=Path("cal.npz"), scorer="knn",
                        index_factory="IVF16,Flat", search_params={"nprobe": 4},
                        min_recall=0.95, index_memory_mib=512.0, check_ood=("a=x.npz", "b=y"),
                        quantize="int8", opset=19, overwrite=True, threads=1)
    assert res.output.strip().endswith(str(tmp_path / "b"))


@pytest.mark.parametrize("make_run,needle", [
    (lambda p: p / "missing", "run directory not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "model.pt"),
])
def test_errors_are_one_line_exit_2(tmp_path: Path, make_run, needle: str) -> None:
    run = make_run(tmp_path)
    res = CliRunner().invoke(cli.export_main, [str(run), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1]
    assert "Traceback" not in res.output


def test_existing_out_without_force(tiny_run: Path, tiny_bundle: Path) -> None:
    res = CliRunner().invoke(cli.export_main, [str(tiny_run), "--out", str(tiny_bundle)])
    assert res.exit_code == 2 and "--force" in res.output


def test_bad_choice_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.export_main, [str(tmp_path), "--out", "b", "--quantize", "int4"])
    assert res.exit_code == 2 and "int4" in res.output

"""bench/bank_scale.py runs end to end at 10^5 rows (slow: about a minute on 2 cores)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.cifar_pack
def test_bank_scale_at_1e5_rows(tiny_run: Path, shared_data: Path, tmp_path: Path,
                                capsys) -> None:
    """10,000 CIFAR-10 images x 2 augmented views x 5 noisy copies = 10^5 rows."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bank_scale
    finally:
        sys.path.remove(str(REPO / "bench"))
    res = bank_scale.main(["--run", str(tiny_run), "--data", str(shared_data), "--cache",
                           str(tmp_path), "--sizes", "1e5", "--views", "2", "--copies", "5",
                           "--single", "50", "--threads", "2"])
    out = capsys.readouterr().out
    rows = {r["method"]: r for r in res["sizes"][100_000]}
    assert set(rows) == {"flat", "auto: Flat", "mahalanobis"}
    assert rows["flat"]["recall_id"] == rows["auto: Flat"]["recall_ood"] == 1.0
    assert rows["flat"]["bytes"] == 100_000 * 128 * 4
    assert all(r["qps"] > 0 and r["p50_ms"] > 0 for r in rows.values())
    assert "bank 100,000 rows" in out
    assert json.loads(out.strip().splitlines()[-1][len("RESULT "):])["k"] == 100

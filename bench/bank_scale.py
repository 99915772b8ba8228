"""Bank size against search cost and accuracy: Flat, the `auto` index and the Mahalanobis scorer.

    .venv/bin/python bench/bank_scale.py [--run RUN_DIR] [--sizes 1e4,1e5,1e6] [--views 100]

Builds banks of each size from real embeddings (`bank_data.py`: the run's network over augmented
views of the pack's CIFAR-10 training images, cached under bench_out/bank_scale; the first run
embeds them, which takes about half an hour of one core for 10^6 rows) and prints, for exact
search (Flat), the index `--index auto` chooses (`detector_server.index_choice.choose_index`,
tuned on the calibration half of the CIFAR-10 test split) and the Mahalanobis scorer fitted on
the same bank:
- build: seconds to build (auto: with the tuning and its exact-search check; Mahalanobis: the fit);
- bytes: the index's memory (`ann.index_bytes`) or the scorer's parameters;
- q/s: queries per second, batched (all ID test and OOD queries at once, `--threads` threads);
- p50 ms: the median single-query search (or scoring) time over `--single` queries, with one
  thread;
- recall ID / OOD: K-th-neighbour recall against Flat (`ann_check.recalls`) on the held-out ID
  test half and on the OOD sets together (auto's nprobe is tuned on the calibration half);
- dFPR: FPR@95 change against exact KNN in points, per OOD set (CIFAR-100 near, MNIST and
  textures far), the threshold set at 95% TPR on the ID test half by each method's own scores;
  for Mahalanobis it is the difference between two scorers, not an approximation error.
The issue's target at 10^6 rows: p50 <= 5 ms with recall >= 0.99 and every |dFPR| <= 0.5.
The last line is `RESULT {json}`. Load average is printed: other processes skew every figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bank_data  # noqa: E402

from detector_server import ann  # noqa: E402
from detector_server._faiss import faiss  # noqa: E402
from detector_server.ann_check import (  # noqa: E402
    Neighbours,
    exact_neighbours,
    recalls,
    search_neighbours,
)
from detector_server.index_choice import choose_index  # noqa: E402
from detector_server.knn import build_index  # noqa: E402
from detector_server.mahalanobis import MahalanobisScorer, fit_mahalanobis  # noqa: E402
from detector_server.metrics import fpr_at_tpr  # noqa: E402

log = logging.getLogger("bank_scale")
OOD = tuple(bank_data.OOD_SETS)


def _p50_ms(fn: Callable[[np.ndarray], Any], queries: np.ndarray, n: int) -> float:
    """Median ms of `fn` on one query, one thread: a single query is too small to split, and
    waking a second OpenMP thread on a loaded machine costs more than the search itself."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        fn(queries[:1])
        times = []
        for i in range(n):
            q = queries[i % len(queries)][None]
            t = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(threads)
    return statistics.median(times) * 1e3


def _qps(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    t = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - t)


def _fprs(scores: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: 100 * fpr_at_tpr(scores["id_test"], scores[name]) for name in OOD}


def _knn_row(name: str, index: Any, build_s: float, bank: np.ndarray, q: dict[str, np.ndarray],
             held: np.ndarray, exact: Any, k: int, single: int,
             exact_fpr: dict[str, float] | None) -> dict:
    """Measure one index on the held-out queries (ID test half + OOD sets); exact_fpr None: the
    index is the exact one (its search is `exact`)."""
    res = exact if exact_fpr is None else search_neighbours(index, held, k)
    n_id = len(q["id_test"])
    part = {"id": slice(0, n_id), "ood": slice(n_id, len(held))}
    rec = {key: recalls(bank, held[sl], Neighbours(res.sims[sl], res.ids[sl]),
                        Neighbours(exact.sims[sl], exact.ids[sl])) for key, sl in part.items()}
    scores, i = {}, 0
    for key in ("id_test", *OOD):
        scores[key] = res.scores[i:i + len(q[key])]
        i += len(q[key])
    fpr = _fprs(scores)
    return {"method": name, "build_s": build_s, "bytes": ann.index_bytes(index),
            "qps": _qps(lambda x: index.search(x, k), held),
            "p50_ms": _p50_ms(lambda x: index.search(x, k), held, single),
            "recall_id": rec["id"][0], "recall_ood": rec["ood"][0],
            "short": rec["id"][2] + rec["ood"][2],
            "fpr": fpr, "dfpr": {s: fpr[s] - exact_fpr[s] for s in OOD} if exact_fpr else
            {s: 0.0 for s in OOD}, "search_params": ann.current_search_params(index)}


def _mahalanobis_row(bank: np.ndarray, labels: np.ndarray, q: dict[str, np.ndarray],
                     held: np.ndarray, single: int, exact_fpr: dict[str, float]) -> dict:
    t = time.perf_counter()
    scorer = MahalanobisScorer(*fit_mahalanobis(bank, labels))
    build = time.perf_counter() - t
    fpr = _fprs({key: scorer.score(q[key])[0] for key in ("id_test", *OOD)})
    return {"method": "mahalanobis", "build_s": build, "bytes": scorer.nbytes,
            "qps": _qps(scorer.score, held), "p50_ms": _p50_ms(scorer.score, held, single),
            "recall_id": None, "recall_ood": None, "short": 0, "fpr": fpr,
            "dfpr": {s: fpr[s] - exact_fpr[s] for s in OOD}, "search_params": {}}


def measure(bank: np.ndarray, labels: np.ndarray, q: dict[str, np.ndarray], k: int,
            single: int, min_recall: float) -> list[dict]:
    """Rows for Flat, auto and Mahalanobis on one bank."""
    held = np.concatenate([q["id_test"], *(q[s] for s in OOD)])
    t = time.perf_counter()
    flat = build_index(bank, "Flat")
    flat_s = time.perf_counter() - t
    exact = exact_neighbours(bank, held, k)
    rows = [_knn_row("flat", flat, flat_s, bank, q, held, exact, k, single, None)]
    exact_fpr = rows[0]["fpr"]
    del flat
    choice = choose_index(bank, q["calibration"], k, min_recall=min_recall)
    row = _knn_row(f"auto: {choice.factory}", choice.index, choice.build_seconds, bank, q, held,
                   exact, k, single, exact_fpr)
    row["calibration_recall"] = None if choice.check is None else choice.check.recall_kth
    rows.append(row)
    del choice
    rows.append(_mahalanobis_row(bank, labels, q, held, single, exact_fpr))
    return rows


def _print(n: int, rows: list[dict]) -> None:
    print(f"\nbank {n:,} rows")
    print(f"{'method':<24}{'build s':>9}{'MiB':>9}{'q/s':>9}{'p50 ms':>8}{'rec ID':>8}"
          f"{'rec OOD':>8}{'short':>6}  " + "  ".join(f"{'dFPR ' + s:>13}" for s in OOD)
          + "  params")
    for r in rows:
        rec = "".join("       -" if r[key] is None else f"{r[key]:>8.4f}"
                      for key in ("recall_id", "recall_ood"))
        print(f"{r['method']:<24}{r['build_s']:>9.2f}{r['bytes'] / 2**20:>9.1f}{r['qps']:>9.0f}"
              f"{r['p50_ms']:>8.3f}{rec}{r['short']:>6}  "
              + "  ".join(f"{r['dfpr'][s]:>+13.2f}" for s in OOD) + f"  {r['search_params']}")
    print("exact FPR@95 (%): " + ", ".join(f"{s} {rows[0]['fpr'][s]:.2f}" for s in OOD))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None,
                   help="trained run whose network embeds (default: train small_cnn, cached)")
    p.add_argument("--data", type=Path, default=bank_data.SHARED)
    p.add_argument("--cache", type=Path, default=bank_data.DEFAULT_CACHE)
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="bank rows, comma-separated")
    p.add_argument("--views", type=int, default=100, help="augmented views per training image")
    p.add_argument("--copies", type=int, default=1,
                   help="noisy copies of every view (cheap extra rows; see bank_data.py)")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--min-recall", type=float, default=0.99)
    p.add_argument("--single", type=int, default=200, help="single queries timed for p50")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="training epochs without --run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    run = args.run or bank_data.train_run(args.data, args.cache, args.epochs)
    bundle = bank_data.export_run(run, args.cache)
    emb, labels = bank_data.bank_views(bundle, args.data, args.cache, args.views)
    emb, labels = bank_data.with_noise_copies(emb, labels, args.copies, args.noise)
    queries = bank_data.query_sets(bundle, args.data)
    order = np.random.default_rng(0).permutation(len(emb))
    results: dict[str, Any] = {"load_avg": os.getloadavg(), "threads": args.threads, "k": args.k,
                               "run": str(run), "sizes": {}}
    print(f"load average {os.getloadavg()}, {args.threads} threads, K={args.k}, "
          f"{len(emb):,} x {emb.shape[1]} embeddings available")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        if n > len(emb):
            raise SystemExit(f"--sizes {n} > {len(emb)} embeddings (raise --views or --copies)")
        pick = np.sort(order[:n])
        rows = measure(np.ascontiguousarray(emb[pick]), labels[pick], queries, args.k,
                       args.single, args.min_recall)
        _print(n, rows)
        results["sizes"][n] = rows
    print(f"load average {os.getloadavg()}")
    print("RESULT " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()

"""Which FAISS index a bank gets, with which search parameters: chosen from its size, then checked.

Use `choose_index(bank, queries, k)` wherever a bank becomes a deployable index (`rwood-export`,
benchmarks): it builds the index, sets its search parameters and measures it against exact search
on held-out in-distribution queries (`ann_check.check_index`), refusing any configuration where a
query gets fewer than K neighbours or the K-th-neighbour recall is below `min_recall`.

The `auto` rule (`plan_index`):
- Flat (exact) while the bank holds at most FLAT_MAX_VALUES = 2^24 numbers (N x D: 64 MiB of
  float32, e.g. 131,072 rows of 128-d or 32,768 of 512-d). One query then costs at most 2^24
  multiply-adds, about 4 ms on one core of the machine the thresholds were measured on.
- Above it, IVF with nlist = sqrt(N) rounded to a power of two (1,024 cells at 10^6 rows), whose
  k-means trains in seconds to a minute on a CPU and whose recall `nprobe` tunes. Vectors stay
  float32 ("IVFn,Flat": exact distances, so scores can only drop) unless `memory_mib` is smaller
  than that needs; then SQ8 (one byte per value), then PQ (m bytes per row), the largest that fits.
  HNSW is not chosen: it takes minutes to build at 10^6 rows on a CPU, has no GPU version in
  faiss and costs more memory; a user may still ask for one ("HNSW32") and gets efSearch tuned.
- The search parameter (nprobe for IVF, efSearch for HNSW) is the smallest of a geometric ladder
  whose recall on the calibration queries reaches `tuning_target(min_recall)` (half the misses
  min_recall allows, so that queries not in the calibration set stay above min_recall), unless
  the caller fixes it; a fixed one must reach min_recall itself.
Numpy + faiss only. Test: tests/runtime/test_index_choice.py.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ann
from .ann_check import SearchCheck, check_index, exact_neighbours
from .errors import InputError
from .knn import build_index
from .validate import check_int, check_number

__all__ = ["AUTO", "FLAT_MAX_VALUES", "DEFAULT_MIN_RECALL", "IndexChoice", "plan_index",
           "nlist_for", "tuning_target", "choose_index"]

log = logging.getLogger(__name__)

AUTO = "auto"
FLAT_MAX_VALUES = 1 << 24
DEFAULT_MIN_RECALL = 0.99
_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
           1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536)


@dataclass
class IndexChoice:
    """A built index with its search parameters, why it was chosen, and its check.

    `to_manifest()` is what the bundle records as `index.choice`: what was asked for, why this
    index, its check, the tuning steps. Not `build_seconds`, which is logged instead: every
    field of the manifest but the descriptive ones counts in the model version, and a
    wall-clock time would give every re-export of the same run a new version.
    """

    index: Any                          # faiss index holding the bank rows in order
    factory: str                        # faiss.index_factory string it was built from
    search_params: dict[str, int]       # set on `index` (empty for Flat)
    requested: str                      # what the caller asked for ("auto" or a factory string)
    reason: str                         # why this index and these parameters, one paragraph
    check: SearchCheck | None = None    # None for exact (Flat) search
    build_seconds: float = 0.0
    trials: list[dict[str, Any]] = field(default_factory=list)   # tuning steps tried

    def to_manifest(self) -> dict[str, Any]:
        return {"requested": self.requested, "reason": self.reason,
                "check": None if self.check is None else self.check.to_dict(),
                "trials": self.trials}


def nlist_for(n_rows: int) -> int:
    """IVF cells for N rows: sqrt(N) rounded to a power of two, at least 16, at most N / 39
    (faiss's k-means wants >= 39 training rows per centroid)."""
    n = check_int(n_rows, "n_rows", minimum=1)
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    return int(max(16, min(nlist, 2 ** int(math.log2(max(16, n // 39))))))


def plan_index(n_rows: int, dim: int, memory_mib: float | None = None) -> tuple[str, str]:
    """(faiss factory string, reason) for `auto` on an N x D bank (module docstring's rule).

    memory_mib: the most the index may take, in MiB (None: no limit). Raises InputError naming
    `index_memory` when even 4-byte PQ codes do not fit.
    """
    n, d = check_int(n_rows, "n_rows", minimum=1), check_int(dim, "dim", minimum=1)
    values = n * d
    if values <= FLAT_MAX_VALUES:
        return "Flat", (f"bank {n:,} x {d} = {values:,} values <= 2^24: exact search (Flat), "
                        f"at most {values * 4 / 2**20:.0f} MiB scanned per query")
    nlist = nlist_for(n)
    budget = None if memory_mib is None else check_number(memory_mib, "index_memory",
                                                          above=0) * 2**20
    head = (f"bank {n:,} x {d} = {values:,} values > 2^24 (Flat would scan "
            f"{values * 4 / 2**20:,.0f} MiB per query): IVF with nlist {nlist} (about sqrt(N)), "
            f"~{n / nlist:,.0f} rows per cell")
    for code, per_row, what in (("Flat", 4 * d, "float32 vectors (exact distances)"),
                                ("SQ8", d, "8-bit scalar-quantised vectors")):
        if budget is None or n * (per_row + 8) <= budget:
            limit = "" if budget is None else f" within {budget / 2**20:,.0f} MiB"
            return f"IVF{nlist},{code}", f"{head}; {what}{limit}"
    m = max((m for m in range(4, d + 1) if d % m == 0 and n * (m + 8) <= budget), default=None)
    if m is None:
        raise InputError(f"{n:,} rows need at least {n * 12 / 2**20:,.0f} MiB even as 4-byte PQ "
                         f"codes; raise --index-memory", field="index_memory")
    return (f"IVF{nlist},PQ{m}", f"{head}; {m}-byte PQ codes (float32 needs "
            f"{n * (4 * d + 8) / 2**20:,.0f} MiB, SQ8 {n * (d + 8) / 2**20:,.0f} MiB, over "
            f"{budget / 2**20:,.0f} MiB)")


def _ladder(index: Any, k: int) -> tuple[str | None, list[int]]:
    """(the parameter to tune, candidate values ascending) for an approximate index."""
    inner, kind = ann._unwrap(index), ann.index_kind(index)
    if kind == "ivf":
        nlist = int(inner.nlist)
        start = math.ceil(k * nlist / max(1, index.ntotal))     # cells that could hold K rows
        return "nprobe", sorted({v for v in _LADDER if start <= v <= nlist} | {nlist})
    if kind == "hnsw":
        return "efSearch", [v for v in _LADDER if k <= v <= max(k * 16, 64)]
    return None, []


def _refusal(factory: str, params: dict[str, int], check: SearchCheck, min_recall: float,
             index: Any, tunable: bool) -> str:
    what = f"{factory!r}" + (f" with {params}" if params else "")
    inner = ann._unwrap(index)
    if check.short_queries:
        text = (f"{what}: {check.short_queries} of {check.n_queries} calibration queries got "
                f"fewer than K={check.k} neighbours (they would all score -2 and never be OOD)")
        if hasattr(inner, "nlist"):
            need = math.ceil(check.k * inner.nlist / max(1, index.ntotal))
            text += (f"; each of the {inner.nlist} cells holds about "
                     f"{index.ntotal / inner.nlist:,.0f} rows, so nprobe must be at least {need}")
    else:
        text = (f"{what}: K-th-neighbour recall {check.recall_kth:.4f} on {check.n_queries} "
                f"calibration queries is below --min-recall {min_recall}")
    if tunable:
        return text + "; raise it with --search NAME=VALUE, or leave it out and export tunes it"
    return text + "; use a finer index (more bytes per row), 'auto', or a lower --min-recall"


def _tune(index: Any, factory: str, bank: np.ndarray, queries: np.ndarray, k: int,
          min_recall: float, tpr: float, exact: Any,
          trials: list[dict[str, Any]]) -> tuple[dict[str, int], SearchCheck]:
    """Smallest ladder value reaching `tuning_target(min_recall)` (else the first reaching
    min_recall itself, logged); InputError with the best reached when none passes."""
    name, values = _ladder(index, k)
    if name is None:
        check = check_index(index, bank, queries, k, tpr=tpr, exact=exact)
        trials.append({"search_params": {}, "recall_kth": check.recall_kth,
                       "short_queries": check.short_queries})
        if check.short_queries or check.recall_kth < min_recall:
            raise InputError(_refusal(factory, {}, check, min_recall, index, False), field="index")
        return {}, check
    target = tuning_target(min_recall)
    best: tuple[float, int] = (-1.0, values[0])
    passing = None                                   # the first value reaching min_recall
    for value in values:
        params = ann.apply_search_params(index, {name: value})
        check = check_index(index, bank, queries, k, tpr=tpr, exact=exact)
        trials.append({"search_params": params, "recall_kth": check.recall_kth,
                       "short_queries": check.short_queries})
        log.debug("%s %s=%d: %s", factory, name, value, check.summary())
        ok = not check.short_queries
        if ok and check.recall_kth >= target:
            return params, check
        if ok and check.recall_kth >= min_recall and passing is None:
            passing = (params, check)
        best = max(best, (check.recall_kth, value))
    if passing is not None:
        log.warning("%s: no %s reaches the tuning target %.4f; %s reaches %.4f >= --min-recall",
                    factory, name, target, passing[0], passing[1].recall_kth)
        ann.apply_search_params(index, passing[0])
        return passing
    raise InputError(f"{factory!r}: no {name} up to {values[-1]} reaches K-th-neighbour recall "
                     f"{min_recall} on {len(queries)} calibration queries (best "
                     f"{best[0]:.4f} at {name}={best[1]}); use a finer index (more bytes per "
                     f"row) or a lower --min-recall", field="index")


def tuning_target(min_recall: float) -> float:
    """The recall the tuning aims at: half the misses `min_recall` allows (0.995 for 0.99).

    The calibration set is a sample: at 10^6 rows nprobe 48 reached 0.993 on 1,000 calibration
    queries but 0.988 on 1,000 held-out ones, nprobe 64 0.998 and 0.997 (bench/bank_scale.py).
    """
    return 1.0 - (1.0 - min_recall) / 2.0


def choose_index(bank: np.ndarray, queries: np.ndarray, k: int, *, factory: str = AUTO,
                 search_params: dict[str, int] | None = None,
                 min_recall: float = DEFAULT_MIN_RECALL, memory_mib: float | None = None,
                 tpr: float = 0.95,
                 ood_queries: Mapping[str, np.ndarray] | None = None) -> IndexChoice:
    """Build the bank's index and set and check its search parameters.

    bank: float32 [N, D] unit rows (the index holds them in this order); queries: float32 [M, D]
    held-out ID embeddings (the calibration set); k: the bundle's K; factory: "auto" or a
    faiss.index_factory string; search_params: fixed parameters (checked, never tuned), or None
    to tune the index's own (nprobe / efSearch); min_recall: the least K-th-neighbour recall
    accepted; memory_mib: index memory limit for "auto"; ood_queries: {name: float32 [M_i, D]}
    OOD embeddings for the FPR figures of the final check (the `--check-ood` sets).
    A Flat index is exact: it gets no check. Raises InputError naming `index`, `search`,
    `min_recall` or `index_memory` when the configuration is refused (see `ann_check`).
    """
    min_recall = check_number(min_recall, "min_recall", above=0, maximum=1)
    fixed = ann.check_search_params(search_params, "search")
    if not isinstance(factory, str) or not factory.strip():
        raise InputError(f"expected 'auto' or a faiss index_factory string, got {factory!r}",
                         field="index")
    requested = factory.strip()
    if requested == AUTO:
        factory, reason = plan_index(bank.shape[0], bank.shape[1], memory_mib)
    else:
        factory, reason = requested, f"{requested!r} as requested"
    t0 = time.perf_counter()
    index = build_index(bank, factory)
    built = time.perf_counter() - t0
    if ann.is_exact(index):
        if fixed:
            ann.apply_search_params(index, fixed, "search")   # refuses: Flat takes none
        log.info("index %s (built in %.1f s): %s", factory, built, reason)
        return IndexChoice(index, factory, {}, requested, reason, None, built)
    exact = exact_neighbours(bank, queries, k)
    trials: list[dict[str, Any]] = []
    if fixed:
        params = ann.apply_search_params(index, fixed, "search")
        check = check_index(index, bank, queries, k, tpr=tpr, exact=exact)
        trials.append({"search_params": params, "recall_kth": check.recall_kth,
                       "short_queries": check.short_queries})
        if check.short_queries or check.recall_kth < min_recall:
            raise InputError(_refusal(factory, fixed, check, min_recall, index, True),
                             field="search")
        reason += f"; search parameters {params} as given"
    else:
        params, check = _tune(index, factory, bank, queries, k, min_recall, tpr, exact, trials)
        if params:
            name, value = next(iter(params.items()))
            reason += (f"; {name} {value} is the smallest tried that reaches K-th-neighbour recall "
                       f"{check.recall_kth:.4f} (target {tuning_target(min_recall):.4f}, "
                       f"--min-recall {min_recall}) on {check.n_queries} calibration queries")
    if ood_queries:
        check = check_index(index, bank, queries, k, tpr=tpr, exact=exact,
                            ood_queries=ood_queries)
    seconds = time.perf_counter() - t0
    log.info("index %s %s (built and checked in %.1f s): %s", factory, params, seconds, reason)
    log.info("index check: %s", check.summary())
    return IndexChoice(index, factory, params, requested, reason, check, seconds, trials)

"""What a bundle's bank holds: rows per class and per source, the edit lineage, and warnings.

Use `bank_info(bundle)` to inspect a bundle before or after `rwood-bank add/remove` (what
`rwood-bank info` prints with `describe_info`): it reads the manifest, labels.npy and the
sources file only (no ONNX Runtime session, no index search), so it is cheap on a serving host.
Warnings: classes without rows, rows of unknown origin (a bundle exported before sources were
recorded), and added rows far from an IVF index's trained centroids (`bank_index.ivf_fit`).
Test: tests/runtime/test_bank_edit.py.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .ann import describe_index
from .bank_index import FAR_FRACTION_WARN, require_bank
from .bundle import load_bundle

__all__ = ["bank_info", "describe_info"]


def bank_info(bundle: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary of the bank of `bundle` (verified as `load_bundle` does, without the
    model check): model_version, rows, index factory, its faiss type and bytes in memory, the
    search parameters it is served with, k, threshold, classes (name -> rows),
    sources (origin -> rows, "" = unknown), lineage (the manifest's entries, each with the
    `version` it produced), warnings."""
    b = load_bundle(bundle, verify_model=False)
    m = b.manifest
    require_bank(m, b.path)
    counts = np.bincount(b.labels, minlength=len(m.class_names))
    sources = b.sources()
    lineage = list(m.bank.lineage) if m.bank else []
    # each edit's resulting version: the next edit's parent, the bundle's own for the last
    lineage = [{**e, "version": after} for e, after in
               zip(lineage, [e["parent"] for e in lineage[1:]] + [m.model_version])]
    warnings = [f"class {name!r} has no rows: it is never predicted"
                for name, n in zip(m.class_names, counts) if n == 0]
    if "" in sources.counts():
        warnings.append(f"{sources.counts()['']} rows of unknown origin (exported before sources "
                        "were recorded)")
    for e in lineage:
        fit = e.get("index_fit") or {}
        if fit.get("far_fraction", 0.0) > FAR_FRACTION_WARN:
            warnings.append(f"{fit['far_fraction']:.0%} of the {e['rows']} rows added from "
                            f"{e['from']} ({e['version']}) are farther from the trained IVF "
                            f"centroids than 95% of the calibration images; a small nprobe may "
                            f"miss them (re-export to retrain the index)")
    index = describe_index(b.read_index())
    return {"bundle": str(b.path), "model_version": m.model_version, "rows": m.index.ntotal,
            "index": m.index.factory, "index_type": index["type"], "index_bytes": index.get("bytes"),
            "search_params": dict(m.index.search_params), "k": m.k,
            "threshold": m.threshold.value,
            "classes": {name: int(n) for name, n in zip(m.class_names, counts)},
            "sources": sources.counts(), "lineage": lineage, "warnings": warnings}


def describe_info(info: dict[str, Any]) -> str:
    """`bank_info`'s summary as the text `rwood-bank info` prints."""
    lines = [f"bundle     {info['bundle']}", f"version    {info['model_version']}",
             f"bank       {info['rows']} rows, index {info['index']!r}, K={info['k']}, "
             f"threshold {info['threshold']:.6g}",
             f"index      {info['index_type']}, {_mib(info['index_bytes'])} in memory, search "
             f"parameters {info['search_params'] or 'none (exact)'}", "", "rows per class:"]
    width = max(len(c) for c in info["classes"])
    lines += [f"  {c:<{width}}  {n}" for c, n in info["classes"].items()]
    lines += ["", "rows per source:"]
    lines += [f"  {s or '(unknown)'}  {n}" for s, n in info["sources"].items()]
    if info["lineage"]:
        lines += ["", "lineage (oldest first):"]
        for e in info["lineage"]:
            what = (f"+{e['rows']} rows from {e['from']}" if e["op"] == "add"
                    else f"-{e['rows']} rows ({e['by']})")
            t = e.get("threshold", {})
            lines.append(f"  {e['when']}  {e['parent']} -> {e['version']}: {what}; threshold "
                         f"{t.get('mode', '?')} at {t.get('value', float('nan')):.6g}")
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)


def _mib(nbytes: int | None) -> str:
    return "? MiB" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"

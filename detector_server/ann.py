"""Operating a possibly approximate FAISS index: its kind, search parameters, memory and GPU copy.

Use this module wherever a bundle's index is opened or reported: `apply_search_params` after
reading it (the runtime, with the manifest's parameters or an operator's override), and
`describe_index` for `GetInfo` and the logs. An approximate index searched with the wrong
parameters returns wrong neighbours without any error (an IVF index with faiss's default
nprobe = 1 scans one cell, often fewer rows than K), so the parameters an index was checked with
at export travel with it in the manifest and are set here, by name, through faiss's own
`ParameterSpace` (which reaches an IVF or HNSW index inside a pre-transform too).

Search parameters are a plain `{name: positive int}` dict: "nprobe" (IVF: cells scanned per
query, <= nlist), "efSearch" (HNSW: candidate list length, >= K is sensible), and whatever else
`faiss.ParameterSpace` lists for the index ("quantizer_efSearch", "ht"). Flat takes none.
Numpy + faiss only. Test: tests/runtime/test_ann.py.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ._faiss import faiss
from .errors import InputError
from .validate import check_int, is_int

__all__ = ["SearchParams", "index_kind", "is_exact", "search_param_names", "current_search_params",
           "check_search_params", "parse_search_params", "apply_search_params", "index_bytes",
           "describe_index", "gpu_cloner_options", "GPU_FLOAT16_BYTES"]

log = logging.getLogger(__name__)

SearchParams = dict[str, int]
# An index whose float32 vectors take more than this goes to the GPU as float16 (half the
# memory; inner products change in the 4th significant digit). Smaller ones stay float32.
GPU_FLOAT16_BYTES = 1 << 30
# Parameters read back from an index for reports; set ones are whatever ParameterSpace lists.
_REPORTED = ("nprobe", "efSearch", "quantizer_efSearch")


def _unwrap(index: Any) -> Any:
    """The innermost index that decides the search (through pre-transforms and ID maps)."""
    inner = faiss.downcast_index(index)
    while True:
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            inner = faiss.downcast_index(inner.index)
        else:
            return inner


def index_kind(index: Any) -> str:
    """"flat" (exact), "ivf", "hnsw" or "other" (another approximate index: PQ, SQ, LSH, ...)."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat) or type(inner).__name__.startswith("GpuIndexFlat"):
        return "flat"
    if type(inner).__name__.startswith("GpuIndexIVF"):
        return "ivf"
    return "other"


def is_exact(index: Any) -> bool:
    """True when the index searches exhaustively with exact inner products (a Flat index)."""
    return index_kind(index) == "flat" and not isinstance(faiss.downcast_index(index),
                                                          faiss.IndexPreTransform)


def _space(index: Any) -> Any:
    if type(faiss.downcast_index(index)).__name__.startswith("Gpu") and hasattr(
            faiss, "GpuParameterSpace"):
        return faiss.GpuParameterSpace()
    return faiss.ParameterSpace()


def search_param_names(index: Any) -> list[str]:
    """Names faiss can set on this index (empty for Flat), e.g. ["nprobe"] for "IVF1024,Flat"."""
    space = _space(index)
    space.initialize(index)
    return [space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())]


def current_search_params(index: Any) -> SearchParams:
    """The search parameters the index holds now (nprobe, efSearch, quantizer_efSearch)."""
    inner, out = _unwrap(index), {}
    if hasattr(inner, "nprobe"):
        out["nprobe"] = int(inner.nprobe)
    if isinstance(inner, faiss.IndexHNSW):
        out["efSearch"] = int(inner.hnsw.efSearch)
    if isinstance(inner, faiss.IndexIVF):
        quantizer = faiss.downcast_index(inner.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            out["quantizer_efSearch"] = int(quantizer.hnsw.efSearch)
    return {k: out[k] for k in _REPORTED if k in out}


def served_version(manifest: Any, override: SearchParams) -> str:
    """The model version results carry when `override` (checked search parameters) is set over
    a bundle's (`manifest`): the bundle's version, plus "+name=value" for each parameter that
    differs from the recorded one ("run-3f9a0c1d2e4b+nprobe=64"). So score tables (`--resume`),
    metrics and GetInfo never mix results of two search settings; no override, the bundle's."""
    recorded = manifest.index.search_params if manifest.index is not None else {}
    changed = [f"{k}={v}" for k, v in sorted(override.items()) if recorded.get(k) != v]
    return manifest.model_version + "".join(f"+{c}" for c in changed)


def check_search_params(params: Any, field: str = "search_params") -> SearchParams:
    """`params` as a {name: positive int} dict (a copy, names sorted); InputError naming `field`."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InputError(f"expected a mapping of parameter name -> positive integer, got "
                         f"{type(params).__name__}", field=field)
    out: SearchParams = {}
    for name in sorted(params):
        if not isinstance(name, str) or not name.isidentifier():
            raise InputError(f"expected parameter names such as 'nprobe', got {name!r}", field=field)
        out[name] = check_int(params[name], f"{field}.{name}", minimum=1)
    return out


def parse_search_params(items: Iterable[str], field: str = "search") -> SearchParams:
    """["nprobe=64", "efSearch=128"] (a CLI's repeated NAME=VALUE flag) -> {"nprobe": 64, ...}."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not value.strip().isdigit():
            raise InputError(f"expected NAME=INTEGER such as nprobe=64, got {item!r}", field=field)
        if name.strip() in out:
            raise InputError(f"{name.strip()!r} given twice", field=field)
        out[name.strip()] = int(value)
    return check_search_params(out, field)


def apply_search_params(index: Any, params: Mapping[str, int] | None,
                        field: str = "search_params") -> SearchParams:
    """Set `params` on `index` (in place) and return the parameters it holds afterwards.

    Each name must be one faiss's ParameterSpace knows for this index; "nprobe" must not exceed
    the IVF's nlist. Raises InputError naming `field` otherwise (a Flat index takes none).
    """
    params = check_search_params(params, field)
    if not params:
        return current_search_params(index)
    names = search_param_names(index)
    inner = _unwrap(index)
    for name, value in params.items():
        if name not in names:
            valid = ", ".join(names) if names else "none (exact search)"
            raise InputError(f"{type(inner).__name__} has no search parameter {name!r}; valid: "
                             f"{valid}", field=field)
        if name == "nprobe" and hasattr(inner, "nlist") and value > inner.nlist:
            raise InputError(f"nprobe={value} exceeds the index's {inner.nlist} cells (nlist)",
                             field=f"{field}.nprobe")
    space = _space(index)
    for name, value in params.items():
        space.set_index_parameter(index, name, float(value))
    return current_search_params(index)


def index_bytes(index: Any) -> int:
    """Bytes the index holds in (CPU) memory: vectors or codes, ids, graph links, coarse quantizer.

    Counted from the structures for Flat / SQ / PQ codes, IVF and HNSW (within a few kB of
    faiss's serialised size); other indexes are serialised once to measure them.
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        return _chain_bytes(inner) + index_bytes(inner.index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return 8 * inner.ntotal + index_bytes(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        h = inner.hnsw
        links = 4 * h.neighbors.size() + 4 * h.levels.size() + 8 * h.offsets.size()
        return links + index_bytes(inner.storage)
    if isinstance(inner, faiss.IndexIVF):
        lists = inner.ntotal * (inner.code_size + 8) + 32 * inner.nlist
        return lists + index_bytes(inner.quantizer) + _codebook_bytes(inner)
    if isinstance(inner, faiss.IndexFlatCodes):
        return inner.ntotal * inner.code_size + _codebook_bytes(inner)
    return len(faiss.serialize_index(index))


def _chain_bytes(pre: Any) -> int:
    """Float arrays of a pre-transform chain (PCA / OPQ / random rotation matrices)."""
    total = 0
    for i in range(pre.chain.size()):
        t = faiss.downcast_VectorTransform(pre.chain.at(i))
        total += sum(4 * getattr(t, name).size() for name in ("A", "b", "PCAMat", "eigenvalues",
                                                              "mean") if hasattr(t, name))
    return total


def _codebook_bytes(inner: Any) -> int:
    pq = getattr(inner, "pq", None)
    return 4 * pq.centroids.size() if pq is not None else 0


def describe_index(index: Any) -> dict[str, Any]:
    """What an operator needs to know about a loaded index (GetInfo, logs).

    Returns {"type": faiss class, "kind": index_kind, "exact": bool, "rows": ntotal, "dim": d,
    "bytes": index_bytes (CPU indexes; GPU copies report their CPU size), "nlist": IVF cells
    (IVF only), "search_params": current_search_params}.
    """
    inner = _unwrap(index)
    out: dict[str, Any] = {"type": type(inner).__name__, "kind": index_kind(index),
                           "exact": is_exact(index), "rows": int(index.ntotal), "dim": int(index.d)}
    if not out["type"].startswith("Gpu"):
        out["bytes"] = int(index_bytes(index))
    if hasattr(inner, "nlist") and is_int(inner.nlist):
        out["nlist"] = int(inner.nlist)
    out["search_params"] = current_search_params(index)
    return out


def gpu_cloner_options(index: Any) -> tuple[Any, bool]:
    """(faiss.GpuClonerOptions, float16) for moving `index` to a GPU.

    float16 storage (useFloat16) is used when the index's float32 storage exceeds
    GPU_FLOAT16_BYTES and its type keeps vectors on the GPU as float (Flat, IVF-Flat; IVF-PQ
    uses it for its lookup tables). Needs a faiss build with GPU support.
    """
    opts = faiss.GpuClonerOptions()
    big = index_bytes(index) > GPU_FLOAT16_BYTES
    use = big and index_kind(index) in ("flat", "ivf")
    opts.useFloat16 = use
    return opts, use

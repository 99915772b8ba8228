"""detector_server.ann and ann_check on real embeddings: search parameters, description, the check."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from ann_data import K, noisy_copies, real_embeddings

from detector_server import ann
from detector_server.ann_check import check_index, exact_neighbours
from detector_server.errors import InputError
from detector_server.knn import build_index


@pytest.fixture(scope="module")
def emb(tiny_run: Path, tiny_bundle: Path) -> dict[str, np.ndarray]:
    return real_embeddings(tiny_run, tiny_bundle)


@pytest.fixture(scope="module")
def bank9500(emb) -> np.ndarray:
    """The issue's bank size: 9,500 rows (the 950 real ones and 9 noisy copies)."""
    return noisy_copies(emb["bank"], 10)


def test_kinds_and_parameter_names(emb) -> None:
    x = emb["bank"]
    cases = {"Flat": ("flat", True, []), "IVF16,Flat": ("ivf", False, ["nprobe"]),
             "HNSW8": ("hnsw", False, ["efSearch"]), "SQ8": ("other", False, []),
             "PCA64,IVF16,Flat": ("ivf", False, ["nprobe"])}
    for factory, (kind, exact, names) in cases.items():
        index = build_index(x, factory)
        assert (ann.index_kind(index), ann.is_exact(index)) == (kind, exact), factory
        assert ann.search_param_names(index) == names, factory


def test_search_params_set_read_back_and_survive_write_read(emb, tmp_path: Path) -> None:
    index = build_index(emb["bank"], "IVF16,Flat")
    assert ann.current_search_params(index) == {"nprobe": 1}          # faiss's default
    assert ann.apply_search_params(index, {"nprobe": 6}) == {"nprobe": 6}
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    back = faiss.read_index(str(tmp_path / "i.faiss"))
    assert ann.current_search_params(back) == {"nprobe": 6}
    hnsw = build_index(emb["bank"], "HNSW8")
    assert ann.apply_search_params(hnsw, {"efSearch": 200}) == {"efSearch": 200}
    pre = build_index(emb["bank"], "PCA64,IVF16,Flat")                # reached through the chain
    assert ann.apply_search_params(pre, {"nprobe": 3}) == {"nprobe": 3}


def test_bad_search_params_refused(emb) -> None:
    flat, ivf = build_index(emb["bank"], "Flat"), build_index(emb["bank"], "IVF16,Flat")
    with pytest.raises(InputError, match="no search parameter 'nprobe'.*exact search") as e:
        ann.apply_search_params(flat, {"nprobe": 4})
    assert e.value.field == "search_params"
    with pytest.raises(InputError, match="no search parameter 'efSearch'.*nprobe"):
        ann.apply_search_params(ivf, {"efSearch": 4}, field="search")
    with pytest.raises(InputError, match="exceeds the index's 16 cells") as e:
        ann.apply_search_params(ivf, {"nprobe": 17})
    assert e.value.field == "search_params.nprobe"
    for bad in ({"nprobe": 0}, {"nprobe": True}, {"nprobe": 2.0}, {"": 1}, ["nprobe"]):
        with pytest.raises(InputError):
            ann.check_search_params(bad)
    assert ann.parse_search_params(["nprobe=64", "efSearch=9"]) == {"efSearch": 9, "nprobe": 64}
    for bad in (["nprobe"], ["nprobe=x"], ["nprobe=-1"], ["nprobe=1", "nprobe=2"]):
        with pytest.raises(InputError) as e:
            ann.parse_search_params(bad)
        assert e.value.field == "search"


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "IVF32,SQ8", "IVF32,PQ16x4", "HNSW16",
                                     "SQ8", "PCA64,IVF16,Flat"])
def test_index_bytes_match_the_serialised_size(bank9500, factory: str) -> None:
    index = build_index(bank9500, factory)
    measured = len(faiss.serialize_index(index))
    assert abs(ann.index_bytes(index) - measured) <= 0.01 * measured + 65536, factory
    d = ann.describe_index(index)
    assert d["rows"] == 9500 and d["dim"] == 128 and d["bytes"] == ann.index_bytes(index)
    assert ("nlist" in d) == ("IVF" in factory)


def test_check_of_exact_search_is_perfect(emb) -> None:
    index = build_index(emb["bank"], "Flat")
    c = check_index(index, emb["bank"], emb["id"], K, ood_queries={"photos": emb["ood"]})
    assert c.recall_kth == 1.0 and c.recall_at_k == 1.0 and c.short_queries == 0
    assert c.max_score_diff <= 1e-6 and c.tpr_approx == c.tpr_exact >= 0.95
    assert c.ood["photos"]["fpr_change"] == 0.0 and c.ood["photos"]["n"] == 300
    assert set(c.to_dict()) >= {"recall_kth", "max_score_diff", "tpr_exact", "ood"}


def test_check_sees_the_issue_ivf_case(emb, bank9500) -> None:
    """IVF256 on 9,500 rows at faiss's default nprobe 1: ~37 rows per cell < K = 100."""
    index = build_index(bank9500, "IVF256,Flat")
    c = check_index(index, bank9500, emb["id"], K, ood_queries={"photos": emb["ood"]})
    assert c.short_queries > 0.8 * len(emb["id"]) and c.recall_kth < 0.5
    assert c.max_score_diff > 0.1 and c.ood["photos"]["short_queries"] > 0.5 * 300
    assert c.threshold == -2.0 and c.ood["photos"]["fpr_approx"] == 1.0       # the detector never detects
    ann.apply_search_params(index, {"nprobe": 256})                     # every cell: exhaustive
    c = check_index(index, bank9500, emb["id"], K)
    assert c.short_queries == 0 and c.recall_kth == 1.0 and c.max_score_diff <= 1e-5


def test_ties_count_as_the_kth_neighbour(emb) -> None:
    """A bank with every row twice: which copy is returned must not count as a miss."""
    bank = np.concatenate([emb["bank"], emb["bank"]])
    index = build_index(bank, "IVF8,Flat")
    ann.apply_search_params(index, {"nprobe": 8})
    exact = exact_neighbours(bank[::-1].copy(), emb["id"], K)          # other copies' ids
    exact = type(exact)(exact.sims, len(bank) - 1 - exact.ids)
    c = check_index(index, bank, emb["id"], K, exact=exact)
    assert c.recall_kth == 1.0


def test_check_refuses_mismatched_input(emb) -> None:
    index = build_index(emb["bank"], "Flat")
    with pytest.raises(InputError) as e:
        check_index(index, emb["bank"][:10], emb["id"], K)
    assert e.value.field == "bank"
    with pytest.raises(InputError) as e:
        check_index(index, emb["bank"], emb["id"][:, :5], K)
    assert e.value.field == "queries"
    with pytest.raises(InputError) as e:
        exact_neighbours(emb["bank"], emb["id"], 0)
    assert e.value.field == "k"


@pytest.mark.skipif(not hasattr(faiss, "GpuClonerOptions"), reason="faiss without GPU support")
def test_gpu_cloner_options_float16_only_for_big_indexes(emb) -> None:
    opts, fp16 = ann.gpu_cloner_options(build_index(emb["bank"], "IVF16,Flat"))
    assert not fp16 and not opts.useFloat16

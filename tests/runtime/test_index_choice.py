"""detector_server.index_choice on real embeddings: auto's rule, tuning, refusals with clear messages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ann_data import K, noisy_copies, real_embeddings

from detector_server import ann
from detector_server.errors import InputError
from detector_server.index_choice import FLAT_MAX_VALUES, choose_index, nlist_for, plan_index


@pytest.fixture(scope="module")
def emb(tiny_run: Path, tiny_bundle: Path) -> dict[str, np.ndarray]:
    return real_embeddings(tiny_run, tiny_bundle)


def test_issue_ivf256_with_nprobe_1_is_refused(emb) -> None:
    bank = noisy_copies(emb["bank"], 10)                                 # 9,500 rows
    with pytest.raises(InputError, match=r"\d{3} of 500 calibration queries got fewer than K=100 "
                       r"neighbours.*about 37 rows, so nprobe must be at least 3") as e:
        choose_index(bank, emb["id"], K, factory="IVF256,Flat", search_params={"nprobe": 1})
    assert e.value.field == "search"


def test_issue_ivf256_gets_a_stored_nprobe_that_passes(emb) -> None:
    bank = noisy_copies(emb["bank"], 10)
    c = choose_index(bank, emb["id"], K, factory="IVF256,Flat", ood_queries={"photos": emb["ood"]})
    nprobe = c.search_params["nprobe"]
    assert 3 <= nprobe <= 256 and ann.current_search_params(c.index) == {"nprobe": nprobe}
    assert c.check.short_queries == 0 and c.check.recall_kth >= 0.99
    assert c.check.ood is not None and c.trials[-1]["search_params"] == {"nprobe": nprobe}
    assert all(t["recall_kth"] < 0.995 or t["short_queries"] for t in c.trials[:-1])
    assert c.check.recall_kth >= 0.995                   # tuned to half the misses 0.99 allows
    m = c.to_manifest()
    assert m["requested"] == "IVF256,Flat" and m["check"]["recall_kth"] == c.check.recall_kth
    assert f"nprobe {nprobe} is the smallest" in m["reason"]


def test_auto_picks_flat_for_a_small_bank(emb) -> None:
    bank = noisy_copies(emb["bank"], 10)
    c = choose_index(bank, emb["id"], K)
    assert c.factory == "Flat" and c.search_params == {} and c.check is None
    assert "exact search" in c.reason and c.to_manifest()["check"] is None


def test_auto_picks_ivf_for_a_large_bank(emb) -> None:
    """140 copies of the 950 real rows: 133,000 x 128 > 2^24 values."""
    bank = noisy_copies(emb["bank"], 140, noise=0.02)
    assert bank.size > FLAT_MAX_VALUES
    c = choose_index(bank, emb["id"], K, ood_queries={"photos": emb["ood"]})
    assert c.factory == f"IVF{nlist_for(len(bank))},Flat" == "IVF512,Flat"
    assert c.check.recall_kth >= 0.99 and c.check.short_queries == 0
    assert c.search_params["nprobe"] < 512 // 4          # well below an exhaustive scan
    assert "> 2^24" in c.reason and "smallest tried" in c.reason
    print(f"\nauto on 133,000 rows: {c.factory} {c.search_params}, {c.check.summary()}")


def test_plan_fits_memory_with_sq8_then_pq() -> None:
    assert plan_index(100_000, 128)[0] == "Flat"
    assert plan_index(1_000_000, 128)[0] == "IVF1024,Flat"
    assert plan_index(1_000_000, 128, memory_mib=600)[0] == "IVF1024,Flat"
    assert plan_index(1_000_000, 128, memory_mib=200)[0] == "IVF1024,SQ8"
    factory, reason = plan_index(1_000_000, 128, memory_mib=40)
    assert factory == "IVF1024,PQ32" and "over 40 MiB" in reason
    with pytest.raises(InputError, match="raise --index-memory") as e:
        plan_index(1_000_000, 128, memory_mib=5)
    assert e.value.field == "index_memory"
    assert [nlist_for(n) for n in (1, 10_000, 133_000, 1_000_000, 1_280_000)] == [
        16, 128, 512, 1024, 1024]


def test_refusals_name_the_option(emb) -> None:
    bank = emb["bank"]
    with pytest.raises(InputError, match="no nprobe up to 16 reaches") as e:
        choose_index(bank, emb["id"], K, factory="IVF16,SQ4")
    assert e.value.field == "index"
    with pytest.raises(InputError, match="SQ4.*finer index") as e:
        choose_index(bank, emb["id"], K, factory="SQ4")
    assert e.value.field == "index"
    with pytest.raises(InputError) as e:
        choose_index(bank, emb["id"], K, factory="Flat", search_params={"nprobe": 2})
    assert e.value.field == "search"
    for bad in (0, 1.5, True):
        with pytest.raises(InputError) as e:
            choose_index(bank, emb["id"], K, min_recall=bad)
        assert e.value.field == "min_recall"
    with pytest.raises(InputError) as e:
        choose_index(bank, emb["id"], K, factory=" ")
    assert e.value.field == "index"


def test_the_recorded_choice_repeats_for_the_same_bank(emb) -> None:
    """What the manifest records holds no wall-clock time (the build time is logged): it counts
    in the model version, so the same bank and settings must record the same choice."""
    bank = noisy_copies(emb["bank"], 10)
    a, b = (choose_index(bank, emb["id"], K, factory="IVF64,Flat").to_manifest()
            for _ in range(2))
    assert a == b and a["trials"] and "build_seconds" not in a


def test_hnsw_gets_the_smallest_passing_ef_search(emb) -> None:
    """HNSW is tuned like IVF, on efSearch from K up: the stored value passes the check."""
    c = choose_index(emb["bank"], emb["id"], K, factory="HNSW16")
    ef = c.search_params["efSearch"]
    assert ef >= K and ann.current_search_params(c.index) == {"efSearch": ef}
    assert c.check.short_queries == 0 and c.check.recall_kth >= 0.995
    assert all(t["recall_kth"] < 0.995 or t["short_queries"] for t in c.trials[:-1])

"""detector_server.knn against a brute-force numpy KNN on real image features."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import real_images

from detector_server.errors import InputError
from detector_server.knn import (
    KNNScorer,
    build_index,
    default_k,
    index_to_device,
    knn_score_from_similarities,
)
from detector_server.preprocess import PreprocessSpec, prepare_arrays

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _features(images: np.ndarray, dim: int = 48) -> np.ndarray:
    proj = np.random.default_rng(1).standard_normal((32 * 32 * 3, dim)).astype(np.float32)
    x = prepare_arrays(images, SPEC).reshape(len(images), -1).astype(np.float32) / 255.0
    f = (x - x.mean(axis=1, keepdims=True)) @ proj
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def feats(digits_small, id_images) -> dict[str, np.ndarray]:
    """1,000 training digits as the bank; 300 unseen digits + 100 grey photo patches as queries."""
    gray = prepare_arrays(real_images.gray_photo_patches()[:100], SPEC)
    query = _features(np.concatenate([id_images[-300:], gray]))
    return {"bank": _features(digits_small["images"][:1000]), "labels": digits_small["labels"][:1000],
            "query": query}


def _brute(bank, labels, query, k, num_classes=10):
    sims = query.astype(np.float64) @ bank.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, order, axis=1)
    scores = -np.sqrt(np.maximum(0.0, 2.0 - 2.0 * top[:, -1]))
    pred = []
    for row_ids, row_s in zip(order, top):
        votes = {c: (int((labels[row_ids] == c).sum()), float(row_s[labels[row_ids] == c].sum()))
                 for c in range(num_classes)}
        pred.append(min(votes, key=lambda c: (-votes[c][0], -votes[c][1], c)))
    return scores, np.array(pred), top


@pytest.mark.parametrize("k", [1, 7, 50])
def test_scores_and_votes_match_brute_force(feats, k):
    scorer = KNNScorer(build_index(feats["bank"]), feats["labels"], k=k, num_classes=10)
    scores, pred = scorer.score(feats["query"])
    want_s, want_p, _ = _brute(feats["bank"], feats["labels"], feats["query"], k)
    assert scores.dtype == np.float32 and pred.dtype == np.int64 and scores.shape == (400,)
    np.testing.assert_allclose(scores, want_s, atol=2e-4)
    assert np.mean(pred == want_p) > 0.99  # float32 vs float64 near-ties may flip a rare vote
    # the bank's own rows are their own nearest neighbours (score 0 at k=1)
    if k == 1:
        s0, p0 = scorer.score(feats["bank"][:50])
        np.testing.assert_allclose(s0, 0.0, atol=2e-3)
        assert (p0 == feats["labels"][:50]).all()


def test_chunked_search_equals_one_call(feats):
    index = build_index(feats["bank"])
    a = KNNScorer(index, feats["labels"], k=20).score(feats["query"])
    b = KNNScorer(index, feats["labels"], k=20, chunk_rows=7).score(feats["query"])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    sims, ids = KNNScorer(index, feats["labels"], k=20, chunk_rows=33).search(feats["query"])
    assert sims.shape == ids.shape == (400, 20) and (np.diff(sims, axis=1) <= 0).all()
    np.testing.assert_array_equal(knn_score_from_similarities(sims), a[0])


def test_digit_scores_above_photos(feats):
    scores, _ = KNNScorer(build_index(feats["bank"]), feats["labels"], k=10).score(feats["query"])
    assert scores[:300].mean() > scores[300:].mean()


def test_ivf_index_is_trained_and_close_to_exact(feats):
    index = build_index(feats["bank"], "IVF8,Flat")
    assert index.is_trained and index.ntotal == 1000
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    faiss.extract_index_ivf(index).nprobe = 8  # all lists: exact
    exact = KNNScorer(build_index(feats["bank"]), feats["labels"], k=10).score(feats["query"])
    approx = KNNScorer(index, feats["labels"], k=10).score(feats["query"])
    np.testing.assert_allclose(approx[0], exact[0], atol=1e-5)


def test_missing_neighbours_score_minus_two():
    sims = np.array([[0.9, 0.5, -3.4e38], [1.0000001, 1.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(knn_score_from_similarities(sims), [-2.0, 0.0])


def test_vote_tie_breaks_by_similarity_then_label():
    bank = np.eye(4, dtype=np.float32)
    q = np.array([[0.8, 0.6, 0.0, 0.0],   # neighbours 0 (0.8) and 1 (0.6): one vote each
                  [0.6, 0.8, 0.0, 0.0]], dtype=np.float32)
    scorer = KNNScorer(build_index(bank), np.array([3, 1, 2, 0]), k=2)
    assert scorer.score(q)[1].tolist() == [3, 1]  # larger summed similarity wins the tie
    q_eq = np.array([[0.5, 0.5, 0.5, 0.5]], dtype=np.float32)  # all four equally close
    assert KNNScorer(build_index(bank), np.array([3, 1, 2, 0]), k=4).score(q_eq)[1].tolist() == [0]
    # two votes beat one even when the single neighbour is closer
    q2 = np.array([[0.7, 0.5, 0.5, 0.0]], dtype=np.float32)
    q2 /= np.linalg.norm(q2)
    assert KNNScorer(build_index(bank), np.array([0, 1, 1, 2]), k=3).score(q2)[1].tolist() == [1]


def test_index_to_device_cpu(feats):
    index = build_index(feats["bank"])
    assert index_to_device(index, "cpu") is index
    if faiss.get_num_gpus() == 0:
        assert index_to_device(index, "auto") is index
        with pytest.raises(InputError, match="device"):
            index_to_device(index, "cuda")
    with pytest.raises(InputError, match="device"):
        index_to_device(index, "tpu")


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 4), np.float32), "embeddings.*non-empty"),
    (np.ones((3, 4), np.float64) / 2, "embeddings.*float32"),
    (np.ones(4, np.float32), "embeddings.*2-D"),
    (np.full((3, 4), np.nan, np.float32), "embeddings.*NaN"),
    (np.ones((3, 4), np.float32), "embeddings.*L2-normalised"),
])
def test_build_index_rejects(bad, match):
    with pytest.raises(InputError, match=match):
        build_index(bad)


def test_build_index_bad_factory(feats):
    with pytest.raises(InputError, match="factory"):
        build_index(feats["bank"], "NoSuchIndex")
    with pytest.raises(InputError, match="factory"):
        build_index(feats["bank"][:5], "IVF64,Flat")  # fewer rows than lists
    with pytest.raises(InputError, match="factory"):
        build_index(feats["bank"], "")


def test_scorer_rejects(feats):
    index, labels = build_index(feats["bank"]), feats["labels"]
    for k in (0, 1001, 2.5):
        with pytest.raises(InputError, match="field 'k'"):
            KNNScorer(index, labels, k=k)
    with pytest.raises(InputError, match="labels"):
        KNNScorer(index, labels[:10], k=5)
    with pytest.raises(InputError, match="labels"):
        KNNScorer(index, labels.astype(np.float32), k=5)
    with pytest.raises(InputError, match="labels"):
        KNNScorer(index, labels, k=5, num_classes=5)
    with pytest.raises(InputError, match="num_classes"):
        KNNScorer(index, labels, k=5, num_classes=0)
    with pytest.raises(InputError, match="chunk_rows"):
        KNNScorer(index, labels, k=5, chunk_rows=0)
    with pytest.raises(InputError, match="index"):
        KNNScorer("index.faiss", labels, k=5)
    scorer = KNNScorer(index, labels, k=5)
    with pytest.raises(InputError, match="emb.*48 columns"):
        scorer.score(np.ones((2, 16), np.float32) / 4)
    with pytest.raises(InputError, match="emb.*NaN"):
        scorer.score(np.full((2, 48), np.nan, np.float32))
    with pytest.raises(InputError, match="emb.*float32"):
        scorer.score(feats["query"].astype(np.float64))
    with pytest.raises(InputError, match="sims"):
        knn_score_from_similarities(np.ones(3, np.float32))


def test_default_k():
    """CIDER's K (300 above 10 classes, else 100), never more than the bank holds."""
    assert default_k(10, 50_000) == 100 and default_k(100, 50_000) == 300
    assert default_k(10, 40) == 40 and default_k(11, 299) == 299

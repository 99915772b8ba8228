"""detector_server.mahalanobis on real embeddings: the one definition evaluation and bundles share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ann_data import real_embeddings

from detector_server.errors import InputError
from detector_server.mahalanobis import MahalanobisScorer, fit_mahalanobis
from trainer.mahalanobis import MahalanobisScorer as EvalScorer


@pytest.fixture(scope="module")
def emb(tiny_run: Path, tiny_bundle: Path) -> dict[str, np.ndarray]:
    return real_embeddings(tiny_run, tiny_bundle)


def test_stored_parameters_score_as_evaluation_does(emb, tmp_path: Path) -> None:
    """Means and precision written to .npy and read back score exactly as rwood-eval's scorer."""
    means, precision = fit_mahalanobis(emb["bank"], emb["labels"], 10)
    np.save(tmp_path / "means.npy", means)
    np.save(tmp_path / "precision.npy", precision)
    served = MahalanobisScorer(np.load(tmp_path / "means.npy"), np.load(tmp_path / "precision.npy"))
    evaluated = EvalScorer(emb["bank"], emb["labels"], num_classes=10)
    q = np.concatenate([emb["id"], emb["ood"]])
    s1, p1 = served.score(q)
    s2, p2 = evaluated.score(q)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p1, p2)
    assert (s1 <= 0).all() and s1[:500].mean() > s1[500:].mean()        # ID scores higher
    assert served.nbytes == 8 * (2 * 10 * 128 + 128 * 128)


def test_chunking_and_input_precision_do_not_change_scores(emb) -> None:
    means, precision = fit_mahalanobis(emb["bank"], emb["labels"])
    full = MahalanobisScorer(means, precision).score(emb["id"])
    chunked = MahalanobisScorer(means, precision, chunk_rows=7).score(emb["id"].astype(np.float64))
    # BLAS blocks the products differently: the tiny run's near-singular covariance (a 1-epoch
    # network on 950 digits) turns that into ~2e-6 relative; the parity bound is 1e-5
    np.testing.assert_allclose(full[0], chunked[0], rtol=1e-5)
    np.testing.assert_array_equal(full[1], chunked[1])


def test_nearest_mean_is_the_prediction(emb) -> None:
    means, precision = fit_mahalanobis(emb["bank"], emb["labels"])
    scorer = MahalanobisScorer(means, precision)
    d = scorer.distances(emb["id"][:50])
    scores, pred = scorer.score(emb["id"][:50])
    np.testing.assert_array_equal(pred, d.argmin(1))
    np.testing.assert_allclose(scores, -d.min(1), rtol=1e-6)


def test_bad_parameters_and_inputs_refused(emb) -> None:
    means, precision = fit_mahalanobis(emb["bank"], emb["labels"])
    cases = [((means[:, :5], precision), "precision"), ((means * np.nan, precision), "means"),
             ((means.astype(np.int64), precision), "means"), ((means, precision[:5]), "precision")]
    for args, fld in cases:
        with pytest.raises(InputError) as e:
            MahalanobisScorer(*args)
        assert e.value.field == fld
    with pytest.raises(InputError) as e:
        MahalanobisScorer(means, precision, chunk_rows=0)
    assert e.value.field == "chunk_rows"
    with pytest.raises(InputError) as e:
        MahalanobisScorer(means, precision).score(emb["id"][:, :64])
    assert e.value.field == "emb"
    with pytest.raises(InputError) as e:
        fit_mahalanobis(emb["bank"], emb["labels"], num_classes=11)    # class 10 has no rows
    assert e.value.field == "labels"

"""Reports comparable with the authors' released evaluation (docs/presets.md):

- `--postprocessor mahalanobis` is the released postprocessor. An independent computation follows
  its steps: the L2-normalised penultimate feature from the network's encoder (not our embedding
  path), class means and one shared covariance of the training features fitted with scikit-learn's
  EmpiricalCovariance, score = max over classes of -(x - mu_c)^T P (x - mu_c);
- the OOD-positive FPR@95 column equals OpenOOD's evaluator's formula (roc_curve with OOD as the
  positive class on the negated score, first point at TPR >= 95%), and report.md says which
  convention each column uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import real_images
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_curve

from detector_server.errors import InputError
from detector_server.metrics import fpr_at_tpr, fpr_at_tpr_ood_positive
from detector_server.preprocess import prepare_arrays
from trainer.evaluate import evaluate
from trainer.networks import build_from_args
from trainer.report import write_report
from trainer.run_dir import RunDir

N_ID, N_OOD = 300, 200
OOD = ("gray_photos", "photos")


@pytest.fixture(scope="module")
def sets(digits_small, ood_images, tmp_path_factory) -> dict[str, str]:
    """Digits the tiny run never saw (ID, labelled), grey photo patches (one channel: resized and
    made RGB on the way in) and colour photo patches (OOD)."""
    root = tmp_path_factory.mktemp("released_sets")
    rows = slice(real_images.TINY_RUN_ROWS, real_images.TINY_RUN_ROWS + N_ID)
    arrays = {"id": (digits_small["images"][rows], digits_small["labels"][rows]),
              "gray_photos": (real_images.gray_photo_patches()[:N_OOD], np.full(N_OOD, -1)),
              "photos": (ood_images[:N_OOD], np.full(N_OOD, -1))}
    out = {}
    for name, (images, labels) in arrays.items():
        np.savez(root / f"{name}.npz", images=images, labels=labels)
        out[name] = str(root / f"{name}.npz")
    return out


@pytest.fixture(scope="module")
def mahalanobis_eval(tiny_run: Path, sets: dict[str, str]):
    torch.set_num_threads(2)
    return evaluate(tiny_run, id_test=sets["id"], ood={n: sets[n] for n in OOD},
                    postprocessor="mahalanobis", device="cpu")


def _intermediate_forward(run: RunDir, images: np.ndarray) -> np.ndarray:
    """The released `intermediate_forward`: encoder output, L2-normalised (float64 [N, D])."""
    net = build_from_args(run.info.model_args)
    net.load_state_dict(torch.load(run.file("model.pt"), weights_only=True)["model"])
    net.eval()
    spec = run.info.preprocess
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        return F.normalize(net.encoder(x), dim=1).double().numpy()


def _released_mahalanobis(train_feats: np.ndarray, train_labels: np.ndarray,
                          feats: np.ndarray) -> np.ndarray:
    """The released postprocessor's steps on numpy arrays (float64 throughout)."""
    classes = np.unique(train_labels)
    means = np.stack([train_feats[train_labels == c].mean(0) for c in classes])
    centred = np.concatenate([train_feats[train_labels == c] - means[i]
                              for i, c in enumerate(classes)])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    per_class = np.stack([-np.einsum("nd,de,ne->n", feats - m, precision, feats - m)
                          for m in means], axis=1)
    return per_class.max(axis=1)


def test_mahalanobis_is_the_released_postprocessor(tiny_run, sets, mahalanobis_eval):
    ev = mahalanobis_eval
    assert ev.report["settings"]["postprocessor"] == "mahalanobis"
    assert ev.report["settings"]["feature"] == "penultimate"
    run = RunDir(tiny_run)
    with np.load(run.info.data["path"]) as f:
        train_images, train_labels = f["images"], f["labels"]
    with np.load(run.file("bank.npz")) as b:
        rows = b["indices"]                               # the run's training images (the bank)
    train_feats = _intermediate_forward(run, train_images[rows])
    for name in ("id", *OOD):
        with np.load(sets[name]) as f:   # at model input (grey patches: one channel -> RGB)
            feats = _intermediate_forward(run, prepare_arrays(f["images"], run.info.preprocess))
        want = _released_mahalanobis(train_feats, train_labels[rows], feats)
        np.testing.assert_allclose(ev.embeddings[name], feats, atol=2e-5)    # the scored feature
        # equal up to float32 features and scores (measured: relative difference <= 3.3e-6 on
        # far-OOD scores near -8,000)
        np.testing.assert_allclose(ev.scores[name], want, rtol=2e-5, atol=0)
    # the scores separate the sets at all (the check is not on constants)
    assert np.std(ev.scores["id"]) > 0 and ev.report["ood"]["photos"]["auroc"] != 0.5


def _openood_fpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """OpenOOD's evaluator: OOD positive, roc_curve on the negated confidence, the FPR at the
    first ROC point whose TPR reaches `tpr`."""
    conf = np.concatenate([id_scores, ood_scores])
    ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    fpr, tprs, _ = roc_curve(ood, -conf)
    return float(fpr[np.argmax(tprs >= tpr)])


def test_ood_positive_fpr_equals_openood_formula(mahalanobis_eval, tmp_path):
    ev = mahalanobis_eval
    for name in OOD:
        got = ev.report["ood"][name]["fpr@95_ood_positive"]
        assert got == _openood_fpr(ev.scores["id"], ev.scores[name])
        assert got == fpr_at_tpr_ood_positive(ev.scores["id"], ev.scores[name])
    assert ev.report["average"]["fpr@95_ood_positive"] == pytest.approx(
        np.mean([ev.report["ood"][n]["fpr@95_ood_positive"] for n in OOD]))

    # report.json keeps both FPR@95 columns apart; report.md names every column's convention
    write_report(ev, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"fpr@95", "fpr@95_ood_positive", "auroc", "aupr_in", "aupr_out"} <= set(
        report["ood"]["photos"])
    md = (tmp_path / "report.md").read_text()
    assert "| FPR@95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ | FPR@95 OOD-positive ↓ |" in md
    for key, words in (("fpr@95", "ID is the positive class"), ("auroc", "whichever class"),
                       ("aupr_in", "ID positive"), ("aupr_out", "OOD positive"),
                       ("fpr@95_ood_positive", "OOD is the positive class")):
        line = next(x for x in md.splitlines() if f"[`{key}`]" in x)
        assert words in line, (key, line)


@pytest.mark.parametrize("id_s,ood_s", [
    ([0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.15, 0.25]),
    ([1.0, 1.0, 2.0, 3.0], [0.0, 1.0, 1.0, 1.0, 2.5]),      # ties across the sets
    (list(np.linspace(0, 1, 40)), list(np.linspace(0.5, 1.5, 21))),
])
def test_ood_positive_fpr_on_small_cases(id_s, ood_s):
    i, o = np.asarray(id_s), np.asarray(ood_s)
    assert fpr_at_tpr_ood_positive(i, o) == _openood_fpr(i, o)
    assert fpr_at_tpr_ood_positive(i, o) == fpr_at_tpr(-o, -i)


def test_ood_positive_fpr_refuses_bad_scores():
    with pytest.raises(InputError) as e:
        fpr_at_tpr_ood_positive(np.ones(3), np.array([]))
    assert e.value.field == "ood_scores"
    with pytest.raises(InputError) as e:
        fpr_at_tpr_ood_positive(np.array([np.nan]), np.ones(3))
    assert e.value.field == "id_scores"

"""The figures of `rwood-bank add` on the demo's set-up (slow: it trains the demo model first).

`make demo` trains on digits 0-5 (small_cnn, preset demo, 12 epochs, K=5, seed 0) and exports a
bundle. Digit 6 is then a class the detector never saw: its held-out (test split) images are
flagged OOD at rate X. `rwood-bank add` with 50 training images of digit 6 teaches the deployed
bundle the class without retraining: the held-out 6s are then in-distribution with
predicted_label "6" at rate Y, and the ID test set (digits 0-5, test split) keeps its TPR at the
kept threshold within 1 point. Measured on 2 CPU cores: X = 0.50, Y = 0.83 (36 held-out 6s), ID
TPR 0.981 -> 0.986.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from exporter.export import export_bundle
    from trainer.config import resolve_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("digits")
    torch.set_num_threads(2)
    cfg = resolve_config(preset="demo", overrides=dict(dataset="digits", classes="0-5", epochs=12,
                                                       k=5, seed=0, device="cpu",
                                                       out=str(root / "run")))
    return export_bundle(train(cfg), root / "bundle")


def test_add_digit_6_to_the_demo_bundle(demo_bundle, tmp_path):
    from detector_server.bank_edit import add_images
    from detector_server.detector import Detector
    from trainer.data import load_dataset, select_classes

    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    np.savez(tmp_path / "digit6.npz", images=train.images[train.labels == 6][:50],
             labels=np.zeros(50, np.int64), classes=np.array(["6"]))
    held_out = test.images[test.labels == 6]
    id_test = select_classes(test, list(range(6))).images

    before = Detector(demo_bundle, device="cpu", threads=2)
    x = float(np.mean(before.score_arrays(held_out).is_ood))
    tpr_before = float(np.mean(~before.score_arrays(id_test).is_ood))
    report = add_images(demo_bundle, tmp_path / "digit6.npz", tmp_path / "bundle6")
    after = Detector(tmp_path / "bundle6", device="cpu", threads=2)
    six = after.score_arrays(held_out)
    y = float(np.mean(~six.is_ood & (np.asarray(after.class_names)[six.predicted] == "6")))
    tpr_after = float(np.mean(~after.score_arrays(id_test).is_ood))
    print(f"\nheld-out digit 6 ({len(held_out)} images): OOD before X = {x:.3f}; after adding 50 "
          f"sixes, ID as '6' Y = {y:.3f}; ID test TPR {tpr_before:.4f} -> {tpr_after:.4f} "
          f"({len(id_test)} images); {report.model_version}")
    assert after.class_names == before.class_names + ("6",)
    assert after.threshold == before.threshold                       # kept
    assert x >= 0.3 and y >= 0.7 and y > 1 - x
    assert abs(tpr_after - tpr_before) <= 0.01

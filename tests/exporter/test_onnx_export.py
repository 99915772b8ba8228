"""model.onnx: ONNX Runtime equals the PyTorch DeployModel on real images; declared I/O; opset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detector_server.errors import InputError
from exporter.onnx_export import export_onnx
from trainer.checkpoint import load_model


@pytest.fixture(scope="module")
def images(id_images: np.ndarray, ood_images: np.ndarray) -> np.ndarray:
    """256 real images: 192 unseen digits (ID) and 64 photo patches (OOD), uint8 [256, 32, 32, 3]."""
    return np.concatenate([id_images[:192], ood_images[:64]])


@pytest.mark.parametrize("batch", [1, 64])
def test_onnx_matches_pytorch(tiny_run: Path, tiny_bundle: Path, images: np.ndarray,
                              batch: int) -> None:
    # One thread each: at batch 1 on a shared 2-core machine, multi-threaded torch spends ~20x
    # longer waiting on its OpenMP pool than computing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = load_model(tiny_run)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tiny_bundle / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    worst = {"feature": 0.0, "projection": 0.0}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
            got = sess.run(["feature", "projection"], {"image": x})
            for name, r, g in zip(worst, ref, got):
                assert g.shape == r.shape and g.dtype == np.float32
                worst[name] = max(worst[name], float(np.abs(g - r).max()))
    torch.set_num_threads(threads)
    assert max(worst.values()) <= 1e-4, worst


def test_declared_io_and_opset(tiny_bundle: Path) -> None:
    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain or "": o.version for o in proto.opset_import}[""] >= 17
    sess = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(uint8)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [32, 32, 3]  # dynamic batch
    outs = {o.name: o for o in sess.get_outputs()}
    assert set(outs) == {"feature", "projection"}
    for o in outs.values():
        assert o.type == "tensor(float)" and isinstance(o.shape[0], str) and o.shape[1] == 128


def test_old_opset_refused(tiny_run: Path, tmp_path: Path) -> None:
    model, _ = load_model(tiny_run)
    with pytest.raises(InputError, match="field 'opset'"):
        export_onnx(model, tmp_path / "m.onnx", 32, opset=17)

"""trainer/checkpoint.py: atomic writes, weights_only loads that refuse pickled objects, typed errors
naming the file, RNG state round trips and load_model on a hand-made run directory."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from detector_server.errors import CheckpointError
from detector_server.preprocess import PreprocessSpec
from trainer.checkpoint import (
    FORMAT_VERSION,
    load_model,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from trainer.networks import DeployModel, create_model, model_args
from trainer.run_dir import RunDir, RunInfo, write_run_info

torch.set_num_threads(2)

def _payload_side_effect(path: str) -> None:
    Path(path).write_text("code from a pickle ran")


class _Evil:
    """Unpickling this runs `_payload_side_effect` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_payload_side_effect, (self.marker,))


def test_save_and_load_state_round_trip(tmp_path):
    net = create_model("small_cnn", num_classes=3)
    state = {"model": net.state_dict(), "epoch": 2, "step": 5, "config": {"lr": 0.1, "x": None},
             "rng": rng_state()}
    save_state(tmp_path / "ck" / "last.pt", state)
    back = load_state(tmp_path / "ck" / "last.pt")
    assert back["format_version"] == FORMAT_VERSION
    assert (back["epoch"], back["step"], back["config"]) == (2, 5, {"lr": 0.1, "x": None})
    for k, v in net.state_dict().items():
        assert torch.equal(back["model"][k], v)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"]   # no temp file left


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_state(tmp_path / "nope.pt")
    assert e.value.path == str(tmp_path / "nope.pt") and "not found" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_checkpoint_is_a_checkpoint_error(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_state(path, {"model": create_model("small_cnn", num_classes=2).state_dict()})
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[: len(blob) // 3], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        load_state(path)
    assert e.value.path == str(path) and str(path) in str(e.value)


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "extra": _Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_state(path)
    assert e.value.path == str(path)
    assert not marker.exists(), "load_state unpickled an arbitrary object"


@pytest.mark.parametrize("obj,found", [({"model": {}}, "None"), ({"format_version": 99}, "99"),
                                        ([1, 2, 3], "None")])
def test_wrong_format_version_is_refused(tmp_path, obj, found):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as e:
        load_state(path)
    assert e.value.field == "format_version" and found in str(e.value)


def test_rng_state_round_trip():
    torch.manual_seed(7)
    state = rng_state()
    a = torch.rand(5)
    torch.rand(100)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


# ------------------------------------------------------------------------------ load_model
def _run_dir(tmp_path: Path, with_classifier: bool = False) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=4, head_dim=16, with_classifier=with_classifier)
    spec = PreprocessSpec(size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    save_state(tmp_path / "model.pt", {"model": net.state_dict(), "model_args": model_args(net),
                                       "preprocess": spec.to_dict(),
                                       "class_names": ["a", "b", "c", "d"]})
    info = RunInfo(config={"arch": "small_cnn"}, model_args=model_args(net), preprocess=spec,
                   class_names=("a", "b", "c", "d"))
    write_run_info(tmp_path, info)
    return tmp_path, net


def test_load_model_rebuilds_the_deploy_model(tmp_path, ood_images):
    run, net = _run_dir(tmp_path, with_classifier=True)
    model, info = load_model(run)
    assert isinstance(model, DeployModel) and not model.training
    assert info.class_names == ("a", "b", "c", "d")
    assert info.model_args == {"arch": "small_cnn", "num_classes": 4, "head_dim": 16,
                               "with_classifier": True}
    assert info.preprocess.mean == (0.4, 0.5, 0.6) and info.config == {"arch": "small_cnn"}
    x = torch.from_numpy(ood_images[:6])
    ref = DeployModel(net, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)).eval()
    with torch.no_grad():
        f, p = model(x)
        rf, rp = ref(x)
    assert f.shape == (6, 128) and p.shape == (6, 16)
    torch.testing.assert_close(f, rf)
    torch.testing.assert_close(p, rp)
    np.testing.assert_allclose(f.norm(dim=1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("key", ["model", "model_args", "preprocess", "class_names"])
def test_load_model_missing_key_names_it(tmp_path, key):
    run, _ = _run_dir(tmp_path)
    state = torch.load(run / "model.pt", weights_only=True)
    del state[key]
    torch.save(state, run / "model.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert e.value.field == key and e.value.path == str(run / "model.pt")


def test_load_model_weights_that_do_not_fit(tmp_path):
    run, _ = _run_dir(tmp_path)
    state = torch.load(run / "model.pt", weights_only=True)
    state["model_args"]["head_dim"] = 32
    torch.save(state, run / "model.pt")
    info = RunDir(run).info
    write_run_info(run, dataclasses.replace(info, model_args=state["model_args"]))
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert e.value.field == "model" and "model_args" in str(e.value)


@pytest.mark.parametrize("key,value", [("model_args", {"arch": "small_cnn", "num_classes": 5}),
                                       ("class_names", ("a", "b", "c", "e")),
                                       ("preprocess", PreprocessSpec(32, (0.5,) * 3, (0.2,) * 3))])
def test_load_model_from_another_run_is_refused(tmp_path, key, value):
    """model.pt and config.json must describe the same model: RunInfo has one source."""
    run, _ = _run_dir(tmp_path)
    write_run_info(run, dataclasses.replace(RunDir(run).info, **{key: value}))
    with pytest.raises(CheckpointError, match="another run") as e:
        load_model(run)
    assert e.value.field == key and e.value.path == str(run / "model.pt")


def test_load_model_without_a_run(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert e.value.path == str(tmp_path / "model.pt")

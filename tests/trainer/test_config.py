"""trainer/config.py: precedence (defaults < preset < config file < overrides), key/type checks,
per-dataset defaults and TrainConfig validation. Pure Python: no training here."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from detector_server.errors import InputError
from trainer.config import (
    PRESETS,
    TrainConfig,
    changed_settings,
    default_c_b,
    load_config_file,
    loss_kwargs,
    resolve_config,
)


def _write(path: Path, values: dict) -> Path:
    if path.suffix == ".toml":
        lines = []
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(values))
    return path


# ------------------------------------------------------------------------------ precedence
def test_defaults_when_nothing_given():
    cfg = resolve_config()
    assert cfg == TrainConfig(c_b=-4.0)
    assert (cfg.dataset, cfg.arch, cfg.loss, cfg.c_b, cfg.c_w) == ("digits", "small_cnn",
                                                                   "reweightood", -4.0, -1.0)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_precedence_defaults_preset_file_overrides(tmp_path, suffix):
    # official sets arch, lr=0.1, batch 512, epochs 100; the file changes lr and epochs; the
    # command line changes epochs again. Each level keeps what the higher ones do not name.
    f = _write(tmp_path / f"cfg{suffix}", {"lr": 0.3, "epochs": 7, "m_b": 4, "deterministic": True})
    cfg = resolve_config("official", f, {"epochs": 3, "seed": None})
    assert cfg.arch == "resnet18_cifar"          # preset over default
    assert cfg.batch_size == 512                 # preset, untouched by file and overrides
    assert cfg.lr == 0.3                         # file over preset
    assert cfg.m_b == 4.0 and isinstance(cfg.m_b, float)   # int in the file accepted for a float
    assert cfg.deterministic is True
    assert cfg.epochs == 3                       # override over file
    assert cfg.seed == 0                         # None override ignored: default stays
    assert cfg.momentum == TrainConfig.momentum  # default, named nowhere


def test_toml_and_json_files_give_the_same_config(tmp_path):
    values = {"arch": "resnet18_cifar", "lr": 0.25, "batch_size": 32, "classes": "0-5",
              "tensorboard": False}
    a = resolve_config(config_file=_write(tmp_path / "a.json", values))
    b = resolve_config(config_file=_write(tmp_path / "b.toml", values))
    assert a == b and a.classes == "0-5" and a.batch_size == 32


def test_dashes_in_keys_are_accepted(tmp_path):
    cfg = resolve_config(config_file=_write(tmp_path / "c.json", {"batch-size": 16}))
    assert cfg.batch_size == 16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_only_names_real_fields(name):
    cfg = resolve_config(name)
    known = {f.name for f in fields(TrainConfig)}
    assert set(PRESETS[name]) <= known
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_paper_and_official_presets_match_design():
    off, paper = resolve_config("official"), resolve_config("paper")
    assert (off.lr, off.batch_size, off.epochs, off.weight_decay) == (0.1, 512, 100, 1e-4)
    assert (paper.lr, paper.batch_size, paper.epochs) == (0.5, 512, 500)
    ft = resolve_config("imagenet100-finetune")
    assert (ft.arch, ft.freeze_early, ft.lr, ft.epochs, ft.crop_scale_min) == (
        "resnet50", True, 0.01, 10, 0.4)


# ------------------------------------------------------------------------------ c_b per dataset
def test_cifar100_defaults_c_b_to_minus_two_unless_set(tmp_path):
    assert resolve_config(overrides={"dataset": "cifar100"}).c_b == -2.0
    assert resolve_config(overrides={"dataset": "cifar10"}).c_b == -4.0
    assert resolve_config(overrides={"dataset": "cifar100", "c_b": -3.0}).c_b == -3.0
    f = _write(tmp_path / "c.json", {"dataset": "cifar100", "c_b": -1})
    assert resolve_config(config_file=f).c_b == -1.0
    # the dataset may come from the file and the default still follows it
    f2 = _write(tmp_path / "d.json", {"dataset": "cifar100"})
    assert resolve_config(config_file=f2).c_b == -2.0


def test_every_train_config_is_complete():
    """A TrainConfig built directly (not through resolve_config) has a number for c_b, so the
    loss can be built from it; the default follows the dataset unless c_b is given."""
    from trainer.losses import create_loss

    assert TrainConfig().c_b == -4.0 and TrainConfig(dataset="cifar100").c_b == -2.0
    assert TrainConfig(dataset="cifar100", c_b=-3.0).c_b == -3.0
    assert TrainConfig(**TrainConfig(dataset="cifar100").to_dict()).c_b == -2.0
    create_loss("reweightood", **loss_kwargs(TrainConfig()))
    assert default_c_b("cifar100") == -2.0 and default_c_b("folder") == -4.0


def test_changed_settings_names_only_what_was_set():
    assert changed_settings(TrainConfig()) == {}
    assert changed_settings(resolve_config(overrides={"out": "runs/x", "epochs": 3})) == {
        "out": "runs/x", "epochs": 3}
    # c_b follows the dataset: its derived default is no change, an explicit value is
    assert changed_settings(resolve_config(overrides={"dataset": "cifar100"})) == {
        "dataset": "cifar100"}
    assert changed_settings(resolve_config(overrides={"dataset": "cifar100", "c_b": -4.0})) == {
        "dataset": "cifar100", "c_b": -4.0}


def test_loss_kwargs_carries_the_loss_hyperparameters():
    cfg = resolve_config(overrides={"temperature": 0.2, "m_w": 3.0})
    assert loss_kwargs(cfg) == {"temperature": 0.2, "m_b": 5.0, "c_b": -4.0, "m_w": 3.0,
                                "c_w": -1.0}


# ------------------------------------------------------------------------------ refusals
def test_unknown_key_in_file_is_refused_naming_key_and_file(tmp_path):
    f = _write(tmp_path / "bad.json", {"lr": 0.1, "learning_rate": 0.2})
    with pytest.raises(InputError) as e:
        resolve_config(config_file=f)
    assert e.value.field == "learning_rate" and e.value.path == str(f)
    assert "learning_rate" in str(e.value) and "valid ones" in str(e.value)


def test_unknown_override_is_refused():
    with pytest.raises(InputError) as e:
        resolve_config(overrides={"epoch": 3})
    assert e.value.field == "epoch"


@pytest.mark.parametrize("key,value", [
    ("epochs", "3"),            # str for int
    ("epochs", 2.5),            # float for int
    ("epochs", True),           # bool is not an int here
    ("lr", "0.1"),              # str for float
    ("arch", 18),               # int for str
    ("deterministic", 1),       # int for bool
    ("image_size", "big"),      # optional int
    ("warmup_epochs", "3"),     # optional int
    ("c_b", "minus two"),       # optional float
    ("epochs", None),           # null for a non-optional field
])
def test_wrong_type_in_file_is_refused_naming_key(tmp_path, key, value):
    f = _write(tmp_path / "bad.json", {key: value})
    with pytest.raises(InputError) as e:
        load_config_file(f)
    assert e.value.field == key and key in str(e.value)


def test_null_is_accepted_for_optional_fields(tmp_path):
    f = _write(tmp_path / "ok.json", {"image_size": None, "c_b": None, "warmup_epochs": 2})
    cfg = resolve_config(config_file=f)
    assert cfg.image_size is None and cfg.c_b == -4.0 and cfg.warmup_epochs == 2


def test_unknown_preset_is_refused_listing_valid_ones():
    with pytest.raises(InputError) as e:
        resolve_config("offical")
    assert e.value.field == "preset" and "official" in str(e.value) and "offical" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError) as e:
        load_config_file(tmp_path / "nope.toml")
    assert e.value.path == str(tmp_path / "nope.toml") and "not found" in str(e.value)


@pytest.mark.parametrize("name,text", [("bad.json", "{lr: 0.1"), ("bad.toml", "lr = = 1"),
                                       ("list.json", "[1, 2]")])
def test_unparsable_or_non_mapping_file(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(InputError) as e:
        load_config_file(f)
    assert e.value.path == str(f)


@pytest.mark.parametrize("key,value", [
    ("epochs", 0), ("batch_size", 0), ("head_dim", 0), ("checkpoint_every", 0), ("log_every", 0),
    ("eval_batch_size", -1), ("lr", 0.0), ("temperature", -0.1), ("warmup_from", 0.0),
    ("calibration_fraction", 0.5), ("calibration_fraction", -0.01), ("crop_scale_min", 0.0),
    ("crop_scale_min", 1.5), ("device", "tpu"),
])
def test_validation_errors_name_the_field(key, value):
    with pytest.raises(InputError) as e:
        resolve_config(overrides={key: value})
    assert e.value.field == key


def test_config_is_frozen_and_round_trips_through_a_dict():
    cfg = resolve_config("demo", overrides={"seed": 3})
    with pytest.raises(AttributeError):
        cfg.seed = 4  # type: ignore[misc]
    assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg

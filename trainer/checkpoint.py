"""Checkpoints and the run directory's model file: atomic writes, safe loads, resumable state.

Files are written with `detector_server.atomic` (a crash leaves the old file or the new one, never
a torn one); use `load_state` to resume, and `load_model(run_dir)` to get the trained network back as
a `DeployModel`, with the run's `RunInfo` (`trainer.run_dir`), for evaluation and export. Everything
loads with `weights_only=True`: a checkpoint is a plain dict of tensors, numbers, strings and lists,
never arbitrary pickled objects.

Resumable state (`RUN_DIR/checkpoints/last.pt`), a plain dict:
    format_version, model (state_dict), optimizer, scheduler, epoch (epochs finished), step (steps
    finished in the current epoch), global_step, rng {torch, cuda}, config, model_args
Final model (`RUN_DIR/model.pt`):
    format_version, model, model_args, preprocess, class_names
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector_server.atomic import atomic_write
from detector_server.errors import CheckpointError, ReweightOODError
from detector_server.preprocess import PreprocessSpec

from .run_dir import CONFIG_FILE, MODEL_FILE, RunDir

__all__ = ["FORMAT_VERSION", "save_state", "load_state",
           "load_model", "rng_state", "set_rng_state"]

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a resumable training state dict atomically."""
    atomic_write(path, lambda tmp: torch.save({"format_version": FORMAT_VERSION, **state}, tmp))


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True; CheckpointError names the file and key."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint ({type(e).__name__}: {_reason(e)})",
                              path=str(path)) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"expected format_version {FORMAT_VERSION}, got "
                              f"{state.get('format_version') if isinstance(state, dict) else None}",
                              path=str(path), field="format_version")
    return state


def _reason(e: Exception) -> str:
    """One line from a torch.load error: its weights_only refusal spans paragraphs and advises
    weights_only=False; keep only the reason (CLIs print errors as one line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in lines[1:]
                 if not ln.startswith("Check the documentation")]
        lines = [ln for ln in lines if ln] or ["refused by weights_only loading"]
    return " ".join(lines) or "empty or truncated file"


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Load RUN_DIR/model.pt as an eval-mode `DeployModel` (uint8 NHWC -> unit feature, projection).

    Returns (model, info): info is the run's `RunInfo` (config.json, flat). CheckpointError naming
    the file and key for a missing or unreadable model.pt or config.json, and for a model.pt whose
    model_args, preprocess or class_names differ from config.json's (a model from another run).
    """
    from .networks import DeployModel, build_from_args

    run = RunDir(run_dir)
    run.require(MODEL_FILE)
    path = run.file(MODEL_FILE)
    state = load_state(path)
    for key in ("model", "model_args", "preprocess", "class_names"):
        if key not in state:
            raise CheckpointError("missing key", path=str(path), field=key)
    info = run.info
    try:
        spec = PreprocessSpec.from_dict(state["preprocess"])
    except (ReweightOODError, TypeError, ValueError) as e:
        raise CheckpointError(f"unusable preprocessing: {e}", path=str(path),
                              field="preprocess") from None
    for key, mine, theirs in (("model_args", state["model_args"], info.model_args),
                              ("preprocess", spec, info.preprocess),
                              ("class_names", tuple(state["class_names"]), info.class_names)):
        if mine != theirs:
            raise CheckpointError(f"{mine!r} differs from {CONFIG_FILE}'s {theirs!r}: the model "
                                  "is from another run", path=str(path), field=key)
    net = build_from_args(state["model_args"])
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit model_args: {e}", path=str(path),
                              field="model") from None
    return DeployModel(net, spec.mean, spec.std).to(device).eval(), info

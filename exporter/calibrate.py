"""The deployed threshold: calibration images in, `ThresholdInfo` at the target TPR out.

Use `load_calibration_images` to get held-out in-distribution images (the run's calibration.npz,
a user .npz, or an image folder) at model input, and `calibrate_threshold` (defined in
`detector_server.calibration`, shared with `rwood-bank`) on the scores the runtime's own
`Detector` gives them, so the deployed decision is exactly the calibrated one.
The images must not be in the index (DESIGN section 2): the run's calibration split never is;
a user set is checked against the hashes of the bank's images the run keeps (bank_hashes.npy)
and refused, with the count, when it holds any of them.
Test: tests/exporter/test_export.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from detector_server.calibration import MIN_CALIBRATION, calibrate_threshold
from detector_server.errors import DataError, InputError
from detector_server.listing import IMAGE_EXTENSIONS, list_files, read_file
from detector_server.preprocess import PreprocessSpec, decode_image, prepare_arrays, to_model_array
from trainer.run_dir import CALIBRATION_FILE, HASHES_FILE, RunDir, image_hashes

__all__ = ["load_calibration_images", "calibrate_threshold", "MIN_CALIBRATION"]

log = logging.getLogger(__name__)


def load_calibration_images(run_dir: str | Path, calibration: str | Path | None,
                            spec: PreprocessSpec) -> tuple[np.ndarray, str]:
    """Held-out ID images at model input: (uint8 [M, S, S, 3], source description).

    calibration: None = the run's held-out split (`RunDir.calibration`, already at the run's
    input size); a .npz file with key `images` (uint8 [M, H, W(, C)], resized by `spec`); or a
    folder: its image files (by suffix, as `detector_server.listing.list_files` walks it:
    symlinks followed, hidden entries left out).
    Raises DataError naming the path when it is missing, malformed, holds < MIN_CALIBRATION or
    holds images of the run's bank (the training images, compared at model input).
    """
    if calibration is None:
        run = RunDir(run_dir)
        path = run.file(CALIBRATION_FILE)
        images, _ = run.calibration(instead="pass --calibration PATH with held-out "
                                            "in-distribution images")
        source = f"run:{CALIBRATION_FILE}"
    else:
        path = Path(calibration)
        if path.is_dir():
            images, source = _from_folder(path, spec), f"folder:{path.resolve()}"
        elif path.is_file() and path.suffix == ".npz":
            images, source = _from_npz(path, spec), f"npz:{path.resolve()}"
        else:
            raise DataError("expected an .npz file (key 'images') or a folder of images", path=path)
        _refuse_bank_images(RunDir(run_dir), images, path)
    if len(images) < MIN_CALIBRATION:
        raise DataError(f"{len(images)} calibration images; need at least {MIN_CALIBRATION}",
                        path=path)
    log.info("calibration: %d images from %s", len(images), source)
    return images, source


def _refuse_bank_images(run: RunDir, images: np.ndarray, path: Path) -> None:
    """DataError naming `path` when any of `images` (at model input) is one of the bank's."""
    bank = run.bank_hashes()
    if bank is None:
        log.warning("%s has no %s (written before rwood-train kept them): cannot check that the "
                    "calibration images are not training images", run.path, HASHES_FILE)
        return
    overlap = int(np.isin(image_hashes(images), bank).sum())
    if overlap:
        raise DataError(f"{overlap} of the {len(images)} calibration images are training images "
                        "of this run (in the bank): their scores are those of their own "
                        "embeddings, so the threshold would be too high. Use held-out "
                        "in-distribution images, or leave --calibration out to use the run's "
                        "held-out split", path=path)


def _from_npz(path: Path, spec: PreprocessSpec) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise DataError(f"no 'images' array (keys: {f.files})", path=path)
            images = f["images"]
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read: {e}", path=path) from None
    try:
        return prepare_arrays(images, spec)
    except InputError as e:
        raise DataError(str(e), path=path) from None


def _from_folder(path: Path, spec: PreprocessSpec) -> np.ndarray:
    files = list_files(path, suffixes=IMAGE_EXTENSIONS, hidden=False).files
    if not files:
        raise DataError("no image files in this folder (searched recursively)", path=path)
    out = []
    for rel in files:
        f = path / rel
        try:
            out.append(to_model_array(decode_image(read_file(f)), spec))
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=f) from None
        except InputError as e:
            raise DataError(e.message, path=f) from None
    return np.stack(out)

"""Hostile bundle directories: every attack on `load_bundle` is a BundleError naming the file,
bounded in time and memory, and nothing outside the bundle is ever read.

Most attacks come with recomputed checksums (whoever can write the bundle can rewrite them, see
SECURITY.md): they must be refused by the reader's own bounds, not by the checksums.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from detector_server.bundle import MANIFEST_FILE, file_sha256, load_bundle, manifest_digest
from detector_server.bundle_files import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, MAX_NPY_HEADER_BYTES
from detector_server.errors import BundleError

pytestmark = pytest.mark.timeout(120)

PAYLOAD = ("model.onnx", "index.faiss", "labels.npy")


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the exported tiny bundle."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _forge(bundle: Path, edit=None, rehash: tuple[str, ...] = ()) -> None:
    """Rewrite manifest.json as an attacker with write access would: apply `edit(raw)`, recompute
    the checksums of `rehash` and the manifest's own digest."""
    path = bundle / MANIFEST_FILE
    raw = json.loads(path.read_text())
    if edit is not None:
        edit(raw)
    for name in rehash:
        raw["files"][name] = file_sha256(bundle / name)
    raw["manifest_sha256"] = manifest_digest(raw)
    path.write_text(json.dumps(raw))


def _npy(header: str, body: bytes = b"", *, length: int | None = None) -> bytes:
    """A version 2.0 .npy file with `header` (padded as numpy does) or a forged header `length`."""
    h = header.encode("latin1")
    h += b" " * (63 - (12 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(h) if length is None else length) + h + body


# ---------------------------------------------------------------------------- manifest.json
def test_deeply_nested_manifest_is_refused(bundle: Path) -> None:
    """200,000 nested arrays used to escape as a RecursionError traceback."""
    path = bundle / MANIFEST_FILE
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BundleError, match="nested deeper than") as e:
        load_bundle(bundle)
    assert e.value.path == str(path)


def test_nesting_past_the_bound_is_refused_with_a_valid_digest(bundle: Path) -> None:
    deep: list = []
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = [deep]
    _forge(bundle, lambda raw: raw["training"].update(notes=deep))
    with pytest.raises(BundleError, match="nested deeper than"):
        load_bundle(bundle)


def test_oversized_manifest_is_refused_unread(bundle: Path) -> None:
    """A valid manifest padded past the size limit: refused from its size, never parsed."""
    path = bundle / MANIFEST_FILE
    text = path.read_text()
    path.write_text(text + " " * (MAX_MANIFEST_BYTES + 1 - len(text.encode())))
    with pytest.raises(BundleError, match=f"over the limit of {MAX_MANIFEST_BYTES}") as e:
        load_bundle(bundle)
    assert e.value.path == str(path)


@pytest.mark.parametrize("extra", ['"x": ' + "9" * 5000, '"x": 1e999', '"x": NaN'])
def test_numbers_json_reads_but_the_digest_cannot_are_refused(bundle: Path, extra: str) -> None:
    """An integer of 5000 digits (ValueError in json.loads) or a non-finite number in a key the
    manifest does not know (ValueError in the strict digest) used to escape as tracebacks."""
    path = bundle / MANIFEST_FILE
    path.write_text(path.read_text().rstrip()[:-1] + ", " + extra + "}")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.path == str(path)


def _load_in_thread(bundle: Path, timeout_s: float) -> BaseException | None:
    """load_bundle's outcome, or a failure if it still blocks after `timeout_s`."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            load_bundle(bundle)
            out.append(None)
        except BaseException as e:          # handed to the test thread
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        for f in bundle.iterdir():          # unblock it: a writer on each FIFO, closed at once
            if f.is_fifo():
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"load_bundle blocked for {timeout_s} s on a FIFO")
    return out[0]


@pytest.mark.parametrize("name", (MANIFEST_FILE, "labels.npy"))
def test_fifo_is_refused_without_blocking(bundle: Path, name: str) -> None:
    """A FIFO (as a hung network file system would) used to block the loader, and with it a
    --watch reload, forever."""
    (bundle / name).unlink()
    os.mkfifo(bundle / name)
    err = _load_in_thread(bundle, 10)
    assert isinstance(err, BundleError) and "not a regular file" in str(err), err
    assert err.path == str(bundle / name)


# ---------------------------------------------------------------------------- symbolic links
@pytest.mark.parametrize("name", PAYLOAD + (MANIFEST_FILE,))
def test_link_out_of_the_bundle_is_refused(bundle: Path, tmp_path: Path, name: str) -> None:
    """The same bytes behind a link to a file outside the bundle: checksums all match, and the
    loader used to follow it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(bundle / name, outside / name)
    (bundle / name).symlink_to(outside / name)
    with pytest.raises(BundleError, match="symbolic link") as e:
        load_bundle(bundle)
    assert e.value.path == str(bundle / name)


def test_link_to_a_device_is_refused(bundle: Path) -> None:
    (bundle / "labels.npy").unlink()
    (bundle / "labels.npy").symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(bundle)


def test_link_inside_the_bundle_is_refused_but_a_linked_bundle_directory_loads(
        bundle: Path, tmp_path: Path) -> None:
    """Files inside a bundle must be regular files (documented in SECURITY.md); the directory
    itself may be a link (the usual `current -> v3` switch)."""
    current = tmp_path / "current"
    current.symlink_to(bundle, target_is_directory=True)
    assert load_bundle(current).manifest.index.ntotal > 0
    shutil.move(bundle / "labels.npy", bundle / "labels.real.npy")
    (bundle / "labels.npy").symlink_to("labels.real.npy")
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(current)


# ---------------------------------------------------------------------------- labels.npy
def test_npy_header_claiming_a_huge_array_is_refused_before_allocating(bundle: Path) -> None:
    """A 150-byte labels.npy whose header says 10^12 int64 rows (8 TB): np.load used to try to
    allocate it (MemoryError traceback)."""
    (bundle / "labels.npy").write_bytes(
        _npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000000,), }"))
    _forge(bundle, rehash=("labels.npy",))
    with pytest.raises(BundleError, match=r"expected int64 \[\d+\], got int64 \(1000000000000,\)"):
        load_bundle(bundle)


def test_npy_matching_a_huge_manifest_is_refused_from_its_size(bundle: Path) -> None:
    """Header and manifest agree on 10^12 rows; the file holds none: refused from its size."""
    (bundle / "labels.npy").write_bytes(
        _npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000000,), }"))
    _forge(bundle, lambda raw: raw["index"].update(ntotal=10**12), rehash=("labels.npy",))
    with pytest.raises(BundleError, match="size") as e:
        load_bundle(bundle)
    assert e.value.path == str(bundle / "labels.npy")


def test_npy_header_length_over_the_bound_is_refused_unread(bundle: Path) -> None:
    """numpy reads the whole header (up to 4 GiB in format 2.0) before checking its size: the
    loader checks the declared length first."""
    (bundle / "labels.npy").write_bytes(_npy("{}", length=2**32 - 1))
    _forge(bundle, rehash=("labels.npy",))
    with pytest.raises(BundleError, match=f"header of {2**32 - 1} bytes.*{MAX_NPY_HEADER_BYTES}"):
        load_bundle(bundle)


def test_npy_of_another_layout_is_refused(bundle: Path) -> None:
    n = load_bundle(bundle, verify_model=False).manifest.index.ntotal
    for arr, match in ((np.zeros(n, ">i8"), "expected int64"),
                       (np.zeros((n, 1), np.int64), "expected int64"),
                       (np.zeros(n, np.int32), "expected int64")):
        np.save(bundle / "labels.npy", arr)
        _forge(bundle, rehash=("labels.npy",))
        with pytest.raises(BundleError, match=match):
            load_bundle(bundle)
    np.save(bundle / "labels.npy", np.zeros(n, np.int64))      # right header, one byte more
    (bundle / "labels.npy").write_bytes((bundle / "labels.npy").read_bytes() + b"\0")
    _forge(bundle, rehash=("labels.npy",))
    with pytest.raises(BundleError, match="size"):
        load_bundle(bundle)


def test_calibration_scores_header_claiming_a_huge_array_is_refused(bundle: Path) -> None:
    """calibration_scores.npy is read through the same bounded reader as the labels."""
    name = load_bundle(bundle, verify_model=False).manifest.calibration_file
    (bundle / name).write_bytes(
        _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"))
    _forge(bundle, rehash=(name,))
    with pytest.raises(BundleError, match="expected finite float32") as e:
        load_bundle(bundle).calibration_scores()
    assert e.value.path == str(bundle / name)

"""rwood-score's Ray engine (detector_server.score_ray) gives the local engine's rows.

Runs a local Ray instance (started and shut down by the engine) on the mixed folder of
test_score_folder.py; skipped when Ray Data is not installed (the optional [ray] extra).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_score_folder import BAD, SUB_GOOD, TOP_GOOD, make_mixed_folder

from detector_server.errors import InputError
from detector_server.score_folder import score_folder
from detector_server.score_table import read_rows


def _require_ray() -> None:
    """Skip without Ray, without importing it: the engine must be the first to import ray, so that
    the local instance it starts listens on loopback only (see score_ray._import_ray)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip('Ray Data not installed (pip install "reweightood[ray]")')


def test_ray_engine_rows_equal_local_engine(tiny_bundle, tmp_path):
    _require_ray()
    folder = make_mixed_folder(tmp_path)
    local_out, ray_out = tmp_path / "local.csv", tmp_path / "ray.jsonl"
    score_folder(tiny_bundle, folder, local_out, recursive=True, workers=0, progress=False)
    s = score_folder(tiny_bundle, folder, ray_out, recursive=True, batch_size=4, workers=1,
                     device="cpu", engine="ray", progress=False)
    local = {r.path: r for r in read_rows(local_out)}
    rows = read_rows(ray_out)
    assert sorted(r.path for r in rows) == sorted(TOP_GOOD | SUB_GOOD | BAD) == sorted(local)
    assert (s.files, s.skipped, s.errors) == (len(rows) + 1, 1, len(BAD))
    for r in rows:
        e = local[r.path]
        assert bool(r.error) == bool(e.error), (r, e)
        if e.error:
            assert math.isnan(r.score) and r.predicted_class == -1
        else:
            assert abs(r.score - e.score) <= 1e-6, (r, e)
            assert (r.is_ood, r.predicted_class, r.predicted_label, r.model_version) == \
                   (e.is_ood, e.predicted_class, e.predicted_label, e.model_version)


def test_ray_engine_without_ray_is_one_clear_error(tiny_bundle, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)           # as if the extra were not installed
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match=r"reweightood\[ray\]"):
        score_folder(tiny_bundle, tmp_path / "in", tmp_path / "s.csv", engine="ray",
                     progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "in"], "refused before writing anything"


def test_both_engines_apply_the_same_read_guards(tiny_bundle, id_images, tmp_path):
    """Both engines read files through score_decode.decode_files, so a file over the size limit
    gets the same error row without being read, a file without an image suffix and without an
    image header gets no row, and a file name that is not UTF-8 keeps its row.

    The Ray engine used to read whole files with Ray Data's read_binary_files: a 1 GiB file was
    read into memory and then failed to decode, with another error than the local engine's."""
    _require_ray()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(id_images[0]).save(src / "ok.png")
    odd = os.fsdecode(b"caf\xe9.png")                   # Latin-1 name: not valid UTF-8
    Image.fromarray(id_images[1]).save(src / odd)
    with open(src / "huge.png", "wb") as f:              # sparse: no disk used, never read
        f.truncate((1 << 30) + 1)
    (src / "notes").write_text("plain text without a suffix\n" * 100)
    tables = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        s = score_folder(tiny_bundle, src, out, batch_size=4, workers=1, device="cpu",
                         engine=engine, progress=False)
        assert (s.files, s.scored, s.errors, s.skipped) == (4, 2, 1, 1), engine
        tables[engine] = {r.path: r for r in read_rows(out)}
    local, ray_rows = tables["local"], tables["ray"]
    assert sorted(ray_rows) == sorted(local) == sorted(["ok.png", odd, "huge.png"])
    assert "over the limit" in local["huge.png"].error
    assert ray_rows["huge.png"].error == local["huge.png"].error
    for p in ("ok.png", odd):
        assert ray_rows[p].error == local[p].error == ""
        assert abs(ray_rows[p].score - local[p].score) <= 1e-6


def _descendants(pid: int) -> set[int]:
    """Process ids below `pid` (from /proc: Ray's gcs_server, raylet and workers)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of TCP sockets `pids` listen on."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:        # 0A: LISTEN
                out.append(cols[1].split(":")[0])
    return out


def _is_loopback(hex_addr: str) -> bool:
    if len(hex_addr) == 8:                                   # IPv4, little-endian: 127.x.x.x
        return hex_addr.endswith("7F")
    return (hex_addr == "00000000000000000000000001000000"   # ::1
            or (hex_addr.startswith("0000000000000000FFFF0000") and hex_addr.endswith("7F")))


def test_local_ray_listens_on_loopback_only(tiny_bundle, tmp_path):
    """A Ray instance the engine starts itself serves only this machine: every socket its
    processes listen on is bound to 127.0.0.1 (Ray otherwise binds the host's address and all
    interfaces)."""
    _require_ray()
    from detector_server.bundle import load_bundle
    from detector_server.score_ray import iter_ray

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS names a cluster: the engine does not start a local Ray")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
    batches = iter_ray(load_bundle(tiny_bundle, verify_model=False), src, ["0.png", "1.png"],
                       batch_size=1, workers=1, device="cpu", max_pixels=1 << 20)
    try:
        next(batches)                                        # Ray is up while the engine runs
        addresses = _listening_addresses(_descendants(os.getpid()))
    finally:
        batches.close()
    assert addresses, "found no listening socket of the Ray processes"
    assert [a for a in addresses if not _is_loopback(a)] == []

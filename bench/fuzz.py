"""Seeded mutation fuzzing of the decoder and of a live rwood-serve's Score.

    .venv/bin/python bench/fuzz.py --bundle BUNDLE [--n 2000] [--seed 0] [--json out.json]

Inputs are real images (shipped with scikit-learn: photo patches and a camera JPEG) in every
encoding the runtime accepts (the "score" cases of the hostile corpus: PNG, JPEG, GIF, BMP, WebP,
TIFF, ICO, 16-bit, CMYK, palette, EXIF, ...),
each mutated by 1-3 seeded operators: bit flips, byte overwrites with boundary values, truncation,
splicing with another image, random insertion, duplicated regions, and patched size fields
(PNG/GIF/BMP headers claiming huge or odd dimensions). Every input goes
1. through `decode_image` + `to_model_array` in this process: an image or an InputError is fine,
   anything else is a crash; decode times over 1 s are listed (a DoS hint);
2. to a `rwood-serve` child process (`--threads 1`) in Score requests of `--batch` images: every
   item must come back with a score or a per-item error that agrees with step 1; an RPC failure,
   a dead server or an unanswered health check is a crash.
Reports inputs, errors by kind, crashes (must be 0), and the server's threads, open file
descriptors and RSS after warm-up and after each of `--passes` passes over the same inputs: no
thread or fd growth at all, and the last pass's RSS within 10% of the highest RSS of the earlier
passes (the allocator keeps the high-water mark of the largest decodes in per-thread arenas, so
RSS moves up and down between passes; a leak sets a new high every pass). Also this process's.
Crashing inputs are saved to `--save DIR` for replay. Exit status 1 when there was a crash or a
leak. MALLOC_ARENA_MAX, when set, is passed on to the server.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "reliability")]

from hostile_corpus import build_hostile_corpus  # noqa: E402

from detector_server.errors import InputError  # noqa: E402
from detector_server.preprocess import PreprocessSpec, decode_image, to_model_array  # noqa: E402

Mutator = Callable[[np.random.Generator, bytes, list[bytes]], bytes]
_BOUNDARY = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)


# ---------------------------------------------------------------------------------------------
# Mutation operators: (rng, data, all seeds) -> mutated bytes
# ---------------------------------------------------------------------------------------------
def bit_flips(rng, data, _):
    b = bytearray(data)
    for i in rng.integers(0, len(b), size=int(rng.integers(1, 17))):
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def boundary_bytes(rng, data, _):
    b = bytearray(data)
    for i in rng.integers(0, len(b), size=int(rng.integers(1, 9))):
        b[i] = _BOUNDARY[int(rng.integers(0, len(_BOUNDARY)))]
    return bytes(b)


def truncate(rng, data, _):
    return data[:int(rng.integers(0, len(data)))]


def splice(rng, data, seeds):
    other = seeds[int(rng.integers(0, len(seeds)))]
    return data[:int(rng.integers(0, len(data) + 1))] + other[int(rng.integers(0, len(other))):]


def insert_random(rng, data, _):
    i = int(rng.integers(0, len(data) + 1))
    return data[:i] + rng.bytes(int(rng.integers(1, 257))) + data[i:]


def duplicate_region(rng, data, _):
    i = int(rng.integers(0, len(data)))
    j = min(len(data), i + int(rng.integers(1, 2049)))
    return data[:j] + data[i:j] * int(rng.integers(1, 9)) + data[j:]


def size_fields(rng, data, _):
    """Patch the declared width/height of PNG, GIF or BMP headers (else bit flips)."""
    b = bytearray(data)
    w, h = (int(x) for x in rng.choice([0, 1, 2, 255, 65535, 100_000, 2**31 - 1, 2**32 - 1,
                                        int(rng.integers(1, 20_000))], size=2))
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24:
        b[16:24] = struct.pack(">II", w, h)
    elif b[:3] == b"GIF" and len(b) >= 10:
        b[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif b[:2] == b"BM" and len(b) >= 26:
        sign = -1 if rng.random() < .5 else 1                   # negative height: top-down BMP
        b[18:26] = struct.pack("<ii", w & 0x7FFFFFFF, (h & 0x7FFFFFFF) * sign)
    else:
        return bit_flips(rng, data, _)
    return bytes(b)


MUTATORS: dict[str, Mutator] = {f.__name__: f for f in (
    bit_flips, boundary_bytes, truncate, splice, insert_random, duplicate_region, size_fields)}


def make_inputs(seeds: list[bytes], n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` (description, bytes): a seed image through 1-3 operators, deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    names = list(MUTATORS)
    out = []
    for k in range(n):
        s = int(rng.integers(0, len(seeds)))
        data, ops = seeds[s], []
        for _ in range(int(rng.integers(1, 4))):
            op = names[int(rng.integers(0, len(names)))]
            data = MUTATORS[op](rng, data, seeds) if data else data
            ops.append(op)
        out.append((f"{k}:seed{s}:{'+'.join(ops)}", data))
    return out


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------
def error_kind(message: str) -> str:
    """A short class for a per-item error message (InputError text)."""
    if "empty" in message:
        return "empty"
    if "pixels" in message or "too large" in message:
        return "too_large"
    if "not one of the accepted formats" in message:
        return "undecodable:unrecognised_format"
    m = re.search(r"cannot (?:decode|convert) image: (\w+)", message)
    return f"undecodable:{m.group(1)}" if m else "other"


def self_stats() -> dict[str, int]:
    from server_proc import proc_stats

    return proc_stats(os.getpid())


def fuzz_decoder(inputs: list[tuple[str, bytes]], spec: PreprocessSpec, max_pixels: int) -> dict:
    """Decode every input here; returns kinds, crashes, slow inputs and per-input ok flags."""
    kinds: collections.Counter = collections.Counter()
    crashes, slow, ok, sizes = [], [], [], []
    t_all = time.perf_counter()
    for name, data in inputs:
        t0 = time.perf_counter()
        try:
            img = decode_image(data, max_pixels)
            to_model_array(img, spec)
            sizes.append((img.width * img.height, f"{img.width}x{img.height}", name, len(data)))
            kinds["scored"] += 1
            ok.append(True)
        except InputError as e:
            kinds[error_kind(str(e))] += 1
            ok.append(False)
        except BaseException as e:  # noqa: BLE001 - exactly what a fuzzer looks for
            crashes.append({"input": name, "error": f"{type(e).__name__}: {e}",
                            "trace": traceback.format_exc(limit=4)})
            ok.append(None)
        dt = time.perf_counter() - t0
        if dt > 1.0:
            slow.append({"input": name, "seconds": round(dt, 3), "bytes": len(data)})
    largest = [{"pixels": p, "size": wh, "input": n, "bytes": b}
               for p, wh, n, b in sorted(sizes, reverse=True)[:5]]
    return {"kinds": dict(kinds), "crashes": crashes, "slow": slow, "ok": ok, "largest": largest,
            "seconds": round(time.perf_counter() - t_all, 2)}


def fuzz_server(inputs: list[tuple[str, bytes]], local_ok: list, bundle: Path, batch: int,
                log_dir: Path, warm: list[bytes], passes: int = 4) -> dict:
    """Send every input to a rwood-serve child in Score requests, `passes` times; compare each
    verdict with the local one. Stats after warm-up and after each pass: a leak grows on every
    pass, while allocator high-water marks stop growing once the largest inputs have been seen."""
    import grpc
    from grpc_health.v1 import health_pb2
    from hostile_corpus import subprocess_env
    from server_proc import ServerProcess, health_status

    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    kinds: collections.Counter = collections.Counter()
    crashes, disagreements, after_pass = [], [], []
    env = subprocess_env(**({"MALLOC_ARENA_MAX": os.environ["MALLOC_ARENA_MAX"]}
                            if "MALLOC_ARENA_MAX" in os.environ else {}))
    with ServerProcess(bundle, "--max-images", str(max(batch, 1)), env=env,
                       log_path=log_dir / "fuzz_serve.log") as srv:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.DetectorStub(ch)
            # warm-up: full-size requests of good images start every pool thread once
            for _ in range(3):
                stub.Score(pb.ScoreRequest(images=[pb.Image(id="warm", data=warm[i % len(warm)])
                                                   for i in range(batch)]), timeout=60)
            time.sleep(0.5)
            before = srv.stats()
            t0 = time.perf_counter()
            for p in range(passes):
                for lo in range(0, len(inputs), batch):
                    part = inputs[lo:lo + batch]
                    req = pb.ScoreRequest(images=[pb.Image(id=n, data=d) for n, d in part])
                    try:
                        resp = stub.Score(req, timeout=60)
                    except grpc.RpcError as e:
                        crashes.append({"inputs": [n for n, _ in part],
                                        "error": f"{e.code().name}: {e.details()}"})
                        if srv.proc.poll() is not None:
                            crashes.append({"error": f"server died ({srv.proc.returncode})"})
                            break
                        continue
                    for (name, _), r, ok in zip(part, resp.results, local_ok[lo:lo + batch]):
                        if p == 0:
                            kinds["scored" if not r.error else error_kind(r.error)] += 1
                        if r.id != name:
                            disagreements.append({"input": name,
                                                  "why": f"id came back as {r.id!r}"})
                        elif ok is not None and ok != (r.error == ""):
                            disagreements.append({"input": name,
                                                  "why": r.error or "scored by server only"})
                if srv.proc.poll() is not None:
                    break
                time.sleep(0.5)
                after_pass.append(srv.stats())
            seconds = time.perf_counter() - t0
        alive = health_status(srv.target) == health_pb2.HealthCheckResponse.SERVING
    if not alive:
        crashes.append({"error": "server not SERVING after the run"})
    return {"kinds": dict(kinds), "crashes": crashes, "disagreements": disagreements,
            "before": before, "after_pass": after_pass, "passes": passes,
            "seconds": round(seconds, 2)}


def leaked(before: dict, after: dict | None, rss_slack: float = 0.25) -> list[str]:
    """Thread/fd growth, or RSS growth beyond `rss_slack` (allocator caches grow a little)."""
    if after is None:
        return ["process gone"]
    out = []
    if after["threads"] > before["threads"]:
        out.append(f"threads {before['threads']} -> {after['threads']}")
    if after["fds"] > before["fds"]:
        out.append(f"fds {before['fds']} -> {after['fds']}")
    if after["rss_kb"] > before["rss_kb"] * (1 + rss_slack):
        out.append(f"rss {before['rss_kb']} -> {after['rss_kb']} kB")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle for the server part (omit: decoder only)")
    ap.add_argument("--n", type=int, default=2000, help="inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="images per Score request")
    ap.add_argument("--passes", type=int, default=4, help="passes of the inputs through the server")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="decoder pixel limit (default: the runtime's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--save", type=Path, default=None, help="save crashing inputs here")
    args = ap.parse_args(argv)
    import faulthandler

    from detector_server.preprocess import DEFAULT_MAX_PIXELS

    faulthandler.enable()
    seeds = [c.data for c in build_hostile_corpus(seed=args.seed) if c.expect == "score"]
    inputs = make_inputs(seeds, args.n, args.seed)
    spec = PreprocessSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    load = os.getloadavg()
    me_before = self_stats()
    dec = fuzz_decoder(inputs, spec, max_pixels)
    me_after = self_stats()
    report = {"inputs": len(inputs), "seeds": len(seeds), "seed": args.seed,
              "operators": list(MUTATORS), "loadavg_start": [round(x, 2) for x in load],
              "decoder": {k: v for k, v in dec.items() if k != "ok"},
              "bench_process": {"before": me_before, "after": me_after,
                                "peak_rss_mb": round(resource.getrusage(
                                    resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}
    problems = [f"decoder crash: {c['error']}" for c in dec["crashes"]]
    problems += [f"bench process leak: {x}" for x in leaked(me_before, me_after, rss_slack=1.0)
                 if not x.startswith("rss")]
    if args.bundle is not None:
        with tempfile.TemporaryDirectory() as tmp:
            srv = fuzz_server(inputs, dec["ok"], args.bundle, args.batch, Path(tmp), seeds,
                              args.passes)
        report["server"] = srv
        problems += [f"server crash: {c['error']}" for c in srv["crashes"]]
        last = srv["after_pass"][-1] if srv["after_pass"] else None
        problems += [f"server leak: {x}" for x in leaked(srv["before"], last, rss_slack=10.0)]
        if len(srv["after_pass"]) >= 2:     # a leak keeps setting new highs pass after pass
            high = max(srv["after_pass"][:-1], key=lambda st: st["rss_kb"])
            problems += [f"server leak on a repeated pass: {x}" for x in leaked(high, last, 0.10)]
        problems += [f"server/decoder disagree on {d['input']}: {d['why']}"
                     for d in srv["disagreements"]]
    report["problems"] = problems
    if args.save and (dec["crashes"]):
        args.save.mkdir(parents=True, exist_ok=True)
        by_name = dict(inputs)
        for c in dec["crashes"]:
            (args.save / re.sub(r"[^\w.+-]", "_", c["input"])).write_bytes(by_name[c["input"]])
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


def _print(r: dict) -> None:
    d = r["decoder"]
    print(f"fuzz: {r['inputs']} inputs from {r['seeds']} real seed images, seed {r['seed']}, "
          f"load average at start {r['loadavg_start']}")
    print(f"decoder: {d['seconds']} s; outcomes {dict(sorted(d['kinds'].items()))}; "
          f"crashes {len(d['crashes'])}; inputs over 1 s {len(d['slow'])}")
    for s in d["slow"][:5]:
        print(f"  slow: {s}")
    for s in d["largest"][:3]:
        print(f"  largest decoded: {s}")
    b = r["bench_process"]
    print(f"bench process: {b['before']} -> {b['after']}, peak RSS {b['peak_rss_mb']} MB")
    if "server" in r:
        s = r["server"]
        print(f"server: {s['passes']} passes in {s['seconds']} s; outcomes (pass 1) "
              f"{dict(sorted(s['kinds'].items()))}; crashes {len(s['crashes'])}; "
              f"disagreements with the decoder {len(s['disagreements'])}")
        print(f"server process after warm-up: {s['before']}")
        for k, st in enumerate(s["after_pass"]):
            print(f"  after pass {k + 1}: {st}")
    print("problems: " + ("none" if not r["problems"] else ""))
    for p in r["problems"][:20]:
        print(f"  {p}")


if __name__ == "__main__":
    sys.exit(main())

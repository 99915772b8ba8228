"""Regenerate the committed gRPC/protobuf code in this folder from protos/rwood/v1/detector.proto.

Use after editing the .proto (needs the dev extra's grpcio-tools; the runtime never imports this):

    python -m detector_server._proto.generate

The generated modules are committed so that the runtime needs no grpcio-tools, and
tests/runtime/test_server_proto.py checks that they equal a fresh generation. The one change made to
protoc's output: the absolute import `from rwood.v1 import detector_pb2` in the service module
becomes a package-relative one, so the code works from inside `detector_server._proto`.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_ROOT", "PROTO_FILE", "OUT_DIR", "generate_sources", "main"]

OUT_DIR = Path(__file__).resolve().parent
PROTO_ROOT = OUT_DIR.parents[1] / "protos"
PROTO_FILE = "rwood/v1/detector.proto"
_GENERATED = ("detector_pb2.py", "detector_pb2.pyi", "detector_pb2_grpc.py")


def generate_sources(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Run protoc (grpcio-tools) on PROTO_FILE; returns {file name: source text} for _GENERATED."""
    from grpc_tools import protoc  # dev-only dependency, imported only here

    if not (proto_root / PROTO_FILE).is_file():
        raise FileNotFoundError(f"{proto_root / PROTO_FILE}: proto file not found")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", str(proto_root / PROTO_FILE)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with status {rc} on {proto_root / PROTO_FILE}")
        gen = Path(tmp) / Path(PROTO_FILE).parent
        out = {name: (gen / name).read_text() for name in _GENERATED}
    out["detector_pb2_grpc.py"] = out["detector_pb2_grpc.py"].replace(
        "from rwood.v1 import detector_pb2", "from . import detector_pb2")
    return out


def main() -> None:
    for name, text in generate_sources().items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote {OUT_DIR / name}", file=sys.stderr)


if __name__ == "__main__":
    main()

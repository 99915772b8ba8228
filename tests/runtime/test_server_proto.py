"""The committed gRPC code is current, compatible with the installed runtime and with pyproject's
bounds, and the wire contract (field numbers) never changes."""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from google import protobuf

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
GEN_DIR = REPO / "detector_server" / "_proto"


def _version(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", s)[:3])


def _gencode_version() -> tuple[int, ...]:
    m = re.search(r"Protobuf Python Version: ([\d.]+)", (GEN_DIR / "detector_pb2.py").read_text())
    assert m, "detector_pb2.py does not state its gencode version"
    return _version(m.group(1))


def test_generated_code_is_current():
    """Regenerating from protos/ with grpcio-tools gives exactly the committed files."""
    pytest.importorskip("grpc_tools")
    from grpc_tools.grpc_version import VERSION as tools_version

    from detector_server._proto.generate import generate_sources

    if tools_version != pb_grpc.GRPC_GENERATED_VERSION:   # another protoc writes other headers
        pytest.skip(f"the committed code was made by grpcio-tools=={pb_grpc.GRPC_GENERATED_VERSION},"
                    f" {tools_version} is installed (the dev extra pins the former)")
    fresh = generate_sources()
    for name, text in fresh.items():
        committed = (GEN_DIR / name).read_text()
        assert committed == text, (f"detector_server/_proto/{name} is stale: run "
                                   f"`python -m detector_server._proto.generate` and commit")


def test_generate_names_missing_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from detector_server._proto.generate import generate_sources

    with pytest.raises(FileNotFoundError, match="detector.proto"):
        generate_sources(tmp_path)


def test_gencode_matches_installed_runtimes():
    gen = _gencode_version()
    runtime = _version(protobuf.__version__)
    assert runtime >= gen and runtime[0] <= gen[0] + 1, (gen, runtime)
    assert _version(grpc.__version__) >= _version(pb_grpc.GRPC_GENERATED_VERSION)


def test_pyproject_bounds_admit_only_compatible_runtimes():
    """pyproject's lower bounds must not admit a protobuf/grpcio older than the generated code."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*)$", d)
        lo = re.search(r">=\s*([\d.]+)", m.group(2))
        lower[m.group(1).lower()] = _version(lo.group(1)) if lo else (0,)
    assert lower.get("protobuf", (0,)) >= _gencode_version(), \
        f"pyproject needs protobuf>={'.'.join(map(str, _gencode_version()))}"
    assert lower.get("grpcio", (0,)) >= _version(pb_grpc.GRPC_GENERATED_VERSION), \
        f"pyproject needs grpcio>={pb_grpc.GRPC_GENERATED_VERSION}"


# The wire contract: a changed number breaks every deployed client. Add fields, never renumber.
WIRE = {
    "Image": {"id": 1, "data": 2},
    "ScoreRequest": {"images": 1, "request_id": 2, "neighbors": 3},
    "Result": {"id": 1, "score": 2, "is_ood": 3, "error": 4, "predicted_class": 5,
               "predicted_label": 6, "neighbors": 7},
    "Neighbor": {"row": 1, "class_index": 2, "label": 3, "similarity": 4, "source": 5,
                 "source_index": 6},
    "ScoreResponse": {"results": 1, "model_version": 2, "request_id": 3, "error_code": 4,
                      "error": 5},
    "GetInfoRequest": {},
    "ModelInfo": {"model_version": 1, "threshold": 2, "k": 3, "class_names": 4, "input_size": 5,
                  "resize": 6, "providers": 7, "device": 8, "max_images": 9,
                  "max_message_bytes": 10, "max_pixels": 11, "max_batch": 12, "scorer": 13},
    "ScorerInfo": {"scorer": 1, "kind": 2, "type": 3, "factory": 4, "rows": 5, "bytes": 6,
                   "search_params": 7, "device": 8, "float16": 9, "queries": 10,
                   "short_queries": 11},
}


@pytest.mark.parametrize("message", sorted(WIRE))
def test_field_numbers_never_change(message):
    fields = {f.name: f.number for f in pb.DESCRIPTOR.message_types_by_name[message].fields}
    for name, number in WIRE[message].items():
        assert fields.get(name) == number, f"{message}.{name} must keep number {number}"


def test_service_shape():
    service = pb.DESCRIPTOR.services_by_name["Detector"]
    assert pb.DESCRIPTOR.package == "rwood.v1"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming,
                        m.server_streaming) for m in service.methods}
    assert methods["Score"] == ("ScoreRequest", "ScoreResponse", False, False)
    assert methods["ScoreStream"] == ("ScoreRequest", "ScoreResponse", True, True)
    assert methods["GetInfo"] == ("GetInfoRequest", "ModelInfo", False, False)

"""rwood-serve security: TLS, mutual TLS (certificates generated here, a mismatched key named),
the bearer token (checked from the metadata before the body is read, any case of the scheme) and
the cap on health Watch streams without it."""
from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from detector_server import server_security
from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.client import DetectorClient
from detector_server.errors import InputError
from detector_server.server import ServeConfig, start_background

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

OPTS = dict(device="cpu", threads=1)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer=None, issuer_key=None, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.subject if issuer is not None else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Server CA + server cert for 127.0.0.1, client CA + client cert, and a rogue CA + cert."""
    d = tmp_path_factory.mktemp("pki")
    files: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        files[name] = d / name
        files[name].write_bytes(data)

    for prefix, leaf, is_server in (("srv", "server", True), ("cli", "client", False),
                                    ("rogue", "rogue-client", False)):
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = _cert(f"{prefix}-ca", ca_key, ca=True)
        cert = _cert(leaf, key, issuer=ca, issuer_key=ca_key, server=is_server)
        write(f"{prefix}_ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        write(f"{prefix}.pem", cert.public_bytes(serialization.Encoding.PEM))
        write(f"{prefix}.key", _pem_key(key))
    return files


def _info_code(target: str, **client_kwargs) -> grpc.StatusCode:
    with DetectorClient(target, timeout=3, retries=0, **client_kwargs) as client:
        try:
            client.info()
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_tls(tiny_bundle, pki, photo_jpeg_files):
    with start_background(tiny_bundle, tls_cert=str(pki["srv.pem"]), tls_key=str(pki["srv.key"]),
                          **OPTS) as srv:
        assert _info_code(srv.target, root_certificates=pki["srv_ca.pem"]) == grpc.StatusCode.OK
        with DetectorClient(srv.target, root_certificates=pki["srv_ca.pem"]) as client:
            jpeg = photo_jpeg_files[0]
            assert client.score([jpeg])[0].error == ""
        # plaintext to a TLS port, and TLS trusting the wrong CA, both fail
        with grpc.insecure_channel(srv.target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.DetectorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _info_code(srv.target, root_certificates=pki["cli_ca.pem"]) == \
            grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(tiny_bundle, pki):
    with start_background(tiny_bundle, tls_cert=str(pki["srv.pem"]), tls_key=str(pki["srv.key"]),
                          tls_client_ca=str(pki["cli_ca.pem"]), **OPTS) as srv:
        ca = pki["srv_ca.pem"]
        assert _info_code(srv.target, root_certificates=ca, client_cert=pki["cli.pem"],
                          client_key=pki["cli.key"]) == grpc.StatusCode.OK
        assert _info_code(srv.target, root_certificates=ca) == grpc.StatusCode.UNAVAILABLE
        assert _info_code(srv.target, root_certificates=ca, client_cert=pki["rogue.pem"],
                          client_key=pki["rogue.key"]) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def token_server(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token.txt"
    path.write_text("s3cret-token\n")
    srv = start_background(tiny_bundle, auth_token_file=str(path), metrics_port=0, **OPTS)
    yield srv
    srv.stop(grace=0)


@pytest.mark.parametrize("metadata, detail", [(None, "missing"),
                                              ((("authorization", "Bearer wrong"),), "wrong"),
                                              ((("authorization", "s3cret-token"),), "wrong")])
def test_missing_or_wrong_token_is_unauthenticated(token_server, metadata, detail):
    with grpc.insecure_channel(token_server.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetInfo(pb.GetInfoRequest(), timeout=5, metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and detail in e.value.details()
        with pytest.raises(grpc.RpcError) as e:   # the streaming call is guarded too
            list(stub.ScoreStream(iter([pb.ScoreRequest()]), timeout=5, metadata=metadata))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_passes_and_health_needs_none(token_server, monkeypatch):
    calls = []
    real = server_security.hmac.compare_digest
    monkeypatch.setattr(server_security.hmac, "compare_digest",
                        lambda a, b: calls.append(1) or real(a, b))
    assert _info_code(token_server.target, token="s3cret-token") == grpc.StatusCode.OK
    assert calls, "the token must be compared with hmac.compare_digest (constant time)"
    with grpc.insecure_channel(token_server.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_scheme_name_is_case_insensitive(token_server, scheme):
    """RFC 6750 (via RFC 7235): the auth scheme is case-insensitive; the token is not."""
    assert _info_code(token_server.target, token=None) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(token_server.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=5,
                            metadata=(("authorization", f"{scheme} s3cret-token"),)).k > 0
        with pytest.raises(grpc.RpcError) as e:
            stub.GetInfo(pb.GetInfoRequest(), timeout=5,
                         metadata=(("authorization", f"{scheme} S3CRET-TOKEN"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["/rwood.v1.Detector/Score", "/rwood.v1.Detector/ScoreStream"])
def test_calls_without_a_token_are_refused_before_their_body_is_read(token_server, method):
    """The refusal comes from the metadata alone: a body that does not parse is never parsed
    (it used to be, and the client got a parse error instead of UNAUTHENTICATED)."""
    with grpc.insecure_channel(token_server.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            if method.endswith("Stream"):
                list(ch.stream_stream(method)(iter([b"\xff\xff garbage"]), timeout=5))
            else:
                ch.unary_unary(method)(b"\xff\xff garbage", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
    metrics = token_server.server.metrics.render().decode()
    assert "rwood_malformed_messages_total{" not in metrics


def test_health_watches_without_a_token_are_capped(tiny_bundle, tmp_path):
    token = tmp_path / "token.txt"
    token.write_text("s3cret-token")
    with start_background(tiny_bundle, auth_token_file=str(token), max_health_watches=2,
                          **OPTS) as srv, grpc.insecure_channel(srv.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        with pytest.raises(grpc.RpcError) as e:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trusted = health.Watch(health_pb2.HealthCheckRequest(), timeout=30,
                               metadata=(("authorization", "Bearer s3cret-token"),))
        assert next(trusted).status == health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING        # Check is never capped
        for w in [*watches, trusted]:
            w.cancel()
        time.sleep(0.3)                                    # the slots free up again
        again = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        again.cancel()


def test_a_key_that_does_not_match_the_certificate_is_named(tiny_bundle, pki, tmp_path):
    """It used to surface as "cannot bind 127.0.0.1:0" (grpc's only message)."""
    with pytest.raises(InputError, match="does not match the certificate") as e:
        start_background(tiny_bundle, tls_cert=str(pki["srv.pem"]), tls_key=str(pki["cli.key"]),
                         **OPTS)
    assert e.value.field == "tls_key" and "bind" not in str(e.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki["srv.key"].read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    for cert, key_path, field, match in (
            (garbage, pki["srv.key"], "tls_cert", "no PEM certificate"),
            (pki["srv.pem"], garbage, "tls_key", "not a PEM private key"),
            (pki["srv.pem"], encrypted, "tls_key", "encrypted")):
        with pytest.raises(InputError, match=match) as e:
            server_security.server_credentials(ServeConfig(tls_cert=str(cert),
                                                           tls_key=str(key_path)))
        assert e.value.field == field

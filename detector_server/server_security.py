"""Security of `rwood-serve`: TLS server credentials and the bearer-token interceptor.

Use `server_credentials(config)` for the listening port (None: plaintext) and, when
`config.auth_token_file` is set, `BearerTokenInterceptor(read_token(path), metrics)` as the first
server interceptor. Both raise InputError naming the option whose file cannot be read or is
unusable (a key that does not match its certificate is reported as such, before binding).
"""
from __future__ import annotations

import hmac
import ssl
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc

from .errors import InputError
from .serve_config import ServeConfig
from .server_guard import HEALTH_PREFIX, refusal
from .server_metrics import ServerMetrics

__all__ = ["server_credentials", "read_token", "BearerTokenInterceptor"]


def _read_file(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path=path, field=field) from None


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with tls_client_ca) credentials, or None for a plaintext port."""
    if config.tls_cert is None:
        return None
    key, cert = _read_file(config.tls_key, "tls_key"), _read_file(config.tls_cert, "tls_cert")
    ca = None if config.tls_client_ca is None else _read_file(config.tls_client_ca, "tls_client_ca")
    _check_pem(config)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _no_passphrase() -> bytes:
    raise InputError("the private key is encrypted; give an unencrypted PEM key", field="tls_key")


def _check_pem(config: ServeConfig) -> None:
    """Load the certificate, key and CA with OpenSSL (Python's ssl) so that each problem is named:
    grpc would only fail to bind the port later, without saying why."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for field, path in (("tls_cert", config.tls_cert), ("tls_client_ca", config.tls_client_ca)):
        if path is not None:
            try:
                ctx.load_verify_locations(cafile=path)
            except ssl.SSLError:
                raise InputError("no PEM certificate in it", path=path, field=field) from None
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key, password=_no_passphrase)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise InputError(f"the private key does not match the certificate {config.tls_cert}",
                             path=config.tls_key, field="tls_key") from None
        raise InputError("not a PEM private key", path=config.tls_key, field="tls_key") from None


def read_token(path: str) -> str:
    """The bearer token in the file at `path`: one word, surrounding whitespace stripped."""
    token = _read_file(path, "auth_token_file").decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise InputError("expected one token without spaces", path=path, field="auth_token_file")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call except health checks
    (load balancers and kubelets probe without credentials). The scheme name is case-insensitive
    (RFC 6750), the token compared in constant time (hmac.compare_digest). Missing or wrong ->
    UNAUTHENTICATED, decided from the metadata alone: the request is never read."""

    def __init__(self, token: str, metrics: ServerMetrics | None = None):
        self._token = token.encode()
        self._metrics = metrics

    def authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        """Whether `metadata` carries the right bearer token."""
        return self._check(metadata) is None

    def _check(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """None when authorized, else why not."""
        got = next((v for k, v in (metadata or ()) if k == "authorization"), "")
        text = got.decode("latin-1") if isinstance(got, bytes) else str(got)
        scheme, _, token = text.strip().partition(" ")
        ok = hmac.compare_digest(token.strip().encode("latin-1", "replace"), self._token)
        if ok and scheme.lower() == "bearer":
            return None
        return "missing bearer token" if not text else "wrong bearer token"

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        reason = self._check(details.invocation_metadata)
        if reason is None:
            return handler
        if self._metrics is not None:
            self._metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, reason)

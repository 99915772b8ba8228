"""Security of `rwood-serve`: TLS server credentials and the bearer-token interceptor.

Use `server_credentials(config)` for the listening port (None: plaintext) and, when
`config.auth_token_file` is set, `BearerTokenInterceptor(read_token(path), metrics)` as a server
interceptor. Both raise InputError naming the option whose file cannot be read or is unusable.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Callable

import grpc

from .errors import InputError
from .serve_config import ServeConfig
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
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def read_token(path: str) -> str:
    """The bearer token in the file at `path`: one word, surrounding whitespace stripped."""
    token = _read_file(path, "auth_token_file").decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise InputError("expected one token without spaces", path=path, field="auth_token_file")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call except health checks
    (load balancers and kubelets probe without credentials). Missing or wrong -> UNAUTHENTICATED.
    The comparison is constant-time (hmac.compare_digest)."""

    _EXEMPT = ("/grpc.health.v1.Health/",)
    _FACTORY = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}

    def __init__(self, token: str, metrics: ServerMetrics | None = None):
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._EXEMPT):
            return handler
        got = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), "")
        got_bytes = got if isinstance(got, bytes) else str(got).encode()
        if hmac.compare_digest(got_bytes, self._expected):
            return handler
        if self._metrics is not None:
            self._metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        reason = "missing bearer token" if not got else "wrong bearer token"

        async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        factory = self._FACTORY[(handler.request_streaming, handler.response_streaming)]
        return factory(deny, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

"""Python client of `rwood-serve`: score image files, bytes or PIL images against a remote detector.

Use `DetectorClient` from any application that has images and wants to know which are out of
distribution, without loading the model itself:

    from detector_server.client import DetectorClient
    with DetectorClient("127.0.0.1:50051") as client:
        for r in client.score(["cat.jpg", "noise.png"]):
            print(r.id, r.score, r.is_ood, r.predicted_label, r.error, r.model_version)
        for n in client.score(["cat.jpg"], neighbors=5)[0].neighbors:   # the evidence
            print(n.row, n.label, n.similarity, n.source)

Images are sent as encoded files (paths are read, PIL images and uint8 arrays are PNG-encoded),
split into requests of at most `max_batch` images and `max_request_mb`, a few requests in flight at
once. UNAVAILABLE (server starting, draining or restarting) is retried with exponential backoff while
the call's `timeout` lasts. Other failures raise `grpc.RpcError` (`.code()`, `.details()`).
"""
from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import grpc
import numpy as np
from PIL import Image

from ._proto import detector_pb2 as pb
from ._proto import detector_pb2_grpc as pb_grpc
from .detector import ItemResult, Neighbor
from .errors import InputError
from .validate import check_int

__all__ = ["DetectorClient", "RemoteResult", "ServerInfo"]

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_IN_FLIGHT = 4            # requests of one score() call sent before waiting for the first answer
_BACKOFF_S = (0.05, 1.0)  # first and largest pause between retries (times a random 0.5..1)


@dataclass(frozen=True)
class RemoteResult(ItemResult):
    """An `ItemResult` plus the version of the model that scored it on the server."""

    model_version: str


@dataclass(frozen=True)
class ServerInfo:
    """What `GetInfo` reports about the served model and the server's limits."""

    model_version: str
    threshold: float
    k: int
    class_names: tuple[str, ...]
    input_size: int
    resize: str
    providers: tuple[str, ...]
    device: str
    max_images: int
    max_message_bytes: int
    max_pixels: int
    max_batch: int
    scorer: dict[str, Any] = field(default_factory=dict)   # ScorerInfo: scorer, kind, type,
    # factory, rows, bytes, search_params, device, float16, queries, short_queries


def _scorer_info(s: pb.ScorerInfo) -> dict[str, Any]:
    """ModelInfo.scorer as a plain dict (search_params a dict of ints)."""
    out = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
    out["search_params"] = {k: int(v) for k, v in s.search_params.items()}
    return out


def _pem(value: bytes | str | os.PathLike | None, field: str) -> bytes | None:
    """PEM bytes given directly, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path=str(value), field=field) from None


def _encode(item: Any, index: int) -> tuple[str, bytes]:
    """(default id, encoded bytes) of one image given as a path, bytes, PIL image or uint8 array."""
    if isinstance(item, (str, os.PathLike)):
        try:
            return str(item), Path(item).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read image: {e.strerror}", path=str(item),
                             field=f"images[{index}]") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return str(index), bytes(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise InputError(f"expected a uint8 HxW or HxWxC array, got {item.dtype} {item.shape}",
                             field=f"images[{index}]")
        item = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)
    if isinstance(item, Image.Image):
        buf = io.BytesIO()
        item.save(buf, format="PNG", compress_level=1)
        return str(index), buf.getvalue()
    raise InputError(f"expected a path, bytes, a PIL image or a uint8 array, got {type(item).__name__}",
                     field=f"images[{index}]")


def _chunks(items: Sequence[tuple[str, bytes]], max_images: int, max_bytes: int
            ) -> list[list[tuple[str, bytes]]]:
    """Split into requests of at most max_images images and (unless one image is bigger) max_bytes."""
    out: list[list[tuple[str, bytes]]] = []
    cur: list[tuple[str, bytes]] = []
    size = 0
    for it in items:
        n = len(it[1]) + len(it[0]) + 16
        if cur and (len(cur) >= max_images or size + n > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        out.append(cur)
    return out


class DetectorClient:
    """Client of the rwood.v1.Detector service (see the module docstring).

    target: "host:port". TLS is used when `tls` is true or any certificate is given:
    `root_certificates` (PEM bytes or path; None = system roots) verifies the server,
    `client_cert` + `client_key` authenticate the client (mutual TLS). `token` is sent as
    `authorization: Bearer <token>`. `timeout` (seconds) bounds each call including retries;
    `retries` is how many times UNAVAILABLE is retried.
    """

    def __init__(self, target: str, *, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, token: str | None = None,
                 timeout: float = 10.0, max_batch: int = 64, retries: int = 3,
                 max_request_mb: float = 16.0, tls: bool = False):
        check_int(max_batch, "max_batch", minimum=1)
        if not timeout > 0:
            raise InputError(f"expected seconds > 0, got {timeout!r}", field="timeout")
        check_int(retries, "retries", minimum=0)
        if (client_cert is None) != (client_key is None):
            raise InputError("give both client_cert and client_key, or neither", field="client_key")
        self.target, self.timeout, self.max_batch, self.retries = target, timeout, max_batch, retries
        self._max_bytes = int(max_request_mb * 2**20)
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        if tls or root_certificates is not None or client_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates, "root_certificates"),
                private_key=_pem(client_key, "client_key"),
                certificate_chain=_pem(client_cert, "client_cert"))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.DetectorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def score(self, images: Iterable[Any], ids: Sequence[str] | None = None, *,
              timeout: float | None = None, neighbors: int = 0) -> list[RemoteResult]:
        """Score images given as paths, bytes (encoded files), PIL images or uint8 arrays.

        Returns one RemoteResult per image, in order; an image the server could not use has
        `error` set (score NaN, predicted_class -1). `ids` default to the path, or the position.
        neighbors: return each image's nearest bank rows (`RemoteResult.neighbors`, nearest
        first; at most the server's K, see `info().k`).
        Raises InputError for an unreadable path, an unsupported item or a negative
        `neighbors`, grpc.RpcError when the server refuses a request (INVALID_ARGUMENT,
        e.g. neighbors above K; RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...) or stays UNAVAILABLE
        past the retries or the timeout.
        """
        check_int(neighbors, "neighbors", minimum=0)
        items = [_encode(x, i) for i, x in enumerate(images)]
        if ids is not None:
            if len(ids) != len(items):
                raise InputError(f"{len(ids)} ids for {len(items)} images", field="ids")
            items = [(str(i), data) for i, (_, data) in zip(ids, items)]
        if not items:
            return []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        requests = [pb.ScoreRequest(images=[pb.Image(id=i, data=d) for i, d in chunk],
                                    neighbors=neighbors)
                    for chunk in _chunks(items, self.max_batch, self._max_bytes)]
        futures = [self._send(r, deadline) for r in requests[:_IN_FLIGHT]]
        out: list[RemoteResult] = []
        for k, request in enumerate(requests):
            if k + _IN_FLIGHT < len(requests):
                futures.append(self._send(requests[k + _IN_FLIGHT], deadline))
            response = self._with_retries(self._stub.Score, request, deadline, futures[k])
            out += [RemoteResult(id=r.id, score=r.score, is_ood=r.is_ood,
                                 predicted_class=r.predicted_class, predicted_label=r.predicted_label,
                                 error=r.error, model_version=response.model_version,
                                 neighbors=tuple(Neighbor(n.row, n.class_index, n.label,
                                                          n.similarity, n.source, n.source_index)
                                                 for n in r.neighbors))
                    for r in response.results]
        return out

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served model's version, threshold, K, class names, input size and the server limits."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        m = self._with_retries(self._stub.GetInfo, pb.GetInfoRequest(), deadline)
        return ServerInfo(model_version=m.model_version, threshold=m.threshold, k=m.k,
                          class_names=tuple(m.class_names), input_size=m.input_size,
                          resize=m.resize, providers=tuple(m.providers), device=m.device,
                          max_images=m.max_images, max_message_bytes=m.max_message_bytes,
                          max_pixels=m.max_pixels, max_batch=m.max_batch,
                          scorer=_scorer_info(m.scorer))

    def _send(self, request: pb.ScoreRequest, deadline: float) -> grpc.Future:
        return self._stub.Score.future(request, timeout=max(deadline - time.monotonic(), 0.001),
                                       metadata=self._metadata)

    def _with_retries(self, method: Any, request: Any, deadline: float,
                      first: grpc.Future | None = None) -> Any:
        """Result of `method(request)` (or of the already-sent `first`), retrying UNAVAILABLE."""
        for attempt in range(self.retries + 1):
            try:
                if attempt == 0 and first is not None:
                    return first.result()
                return method(request, timeout=max(deadline - time.monotonic(), 0.001),
                              metadata=self._metadata)
            except grpc.RpcError as e:
                pause = min(_BACKOFF_S[0] * 2**attempt, _BACKOFF_S[1]) * random.uniform(0.5, 1.0)
                if (e.code() not in _RETRYABLE or attempt == self.retries
                        or time.monotonic() + pause >= deadline):
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "DetectorClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""`ServeConfig`: every option of `rwood-serve`, checked once when it is built.

Use it to configure `detector_server.server.serve`/`start_background` (they take its fields as
keyword arguments); `serve_cli` takes its defaults from here, so a default lives in one place.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .ann import check_search_params, parse_search_params
from .errors import InputError
from .preprocess import DEFAULT_MAX_PIXELS
from .validate import check_int, check_number

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Everything `rwood-serve` can be told; each field is one CLI flag."""

    address: str = "127.0.0.1:50051"    # host:port to bind; loopback unless told otherwise; port 0 = any
    max_batch: int = 64                 # most images per model call
    max_wait_ms: float = 0.0            # longest a lone image waits for others to join its batch
    max_images: int = 256               # most images per ScoreRequest (more -> INVALID_ARGUMENT)
    max_message_mb: float = 64.0        # largest request message (more -> RESOURCE_EXHAUSTED)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, per image
    max_queue_images: int = 4096        # images admitted at once; beyond, UNAVAILABLE (load shedding)
    device: str = "auto"                # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int | None = None          # ONNX Runtime/FAISS threads in all (split over the workers);
                                        # None = the cores this process may use
    workers: int = 1                    # server processes sharing the port (1: this process serves)
    search_params: dict[str, int] = field(default_factory=dict)  # override of the bundle's index
                                        # search parameters (nprobe, efSearch); logged. Also
                                        # given as --search's "NAME=VALUE" strings
    decode_threads: int = 2             # image decode pool
    stream_window: int = 32             # requests in flight per ScoreStream
    tls_cert: str | None = None         # PEM server certificate chain (with tls_key)
    tls_key: str | None = None          # PEM private key
    tls_client_ca: str | None = None    # PEM CA bundle: clients must present a cert it signed (mTLS)
    auth_token_file: str | None = None  # file holding the bearer token clients must send
    metrics_port: int | None = None     # Prometheus /metrics port; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"     # where /metrics listens
    watch: bool = False                 # reload when the bundle's manifest.json changes
    watch_interval_s: float = 2.0       # how often --watch looks
    grace_s: float = 10.0               # on SIGTERM, how long in-flight requests may take to finish
    drain_delay_s: float = 0.5          # on SIGTERM, NOT_SERVING + UNAVAILABLE answers this long
                                        # before the listener closes, and this long after the
                                        # last accepted request is done (part of grace_s)
    # What clients can make the server hold (SECURITY.md lists these limits and their figures).
    max_inflight_mb: float = 128.0      # request bytes (image data, ids) held at once; beyond,
                                        # Score is UNAVAILABLE and streams are not read meanwhile
    max_calls: int = 256                # RPCs at once, all connections (health aside); beyond,
                                        # RESOURCE_EXHAUSTED before the request is read
    max_streams_per_connection: int = 64  # HTTP/2 streams (calls) at once on one connection
    max_health_watches: int = 64        # Health.Watch streams at once without a valid token
    reload_timeout_s: float = 120.0     # a bundle (re)load taking longer is abandoned

    def __post_init__(self) -> None:
        sp = self.search_params
        sp = (sp if isinstance(sp, Mapping) or sp is None
              else parse_search_params(sp, "search_params"))    # --search's NAME=VALUE strings
        object.__setattr__(self, "search_params", check_search_params(sp, "search_params"))
        for name in ("max_batch", "max_images", "max_queue_images", "decode_threads",
                     "stream_window", "workers", "max_calls", "max_streams_per_connection",
                     "max_health_watches"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("max_wait_ms", "grace_s", "drain_delay_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"expected a number >= 0, got {getattr(self, name)!r}", field=name)
        for name in ("max_inflight_mb", "reload_timeout_s"):
            check_number(getattr(self, name), name, above=0)
        for name in ("max_message_mb", "watch_interval_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"expected a number > 0, got {getattr(self, name)!r}", field=name)
        if self.max_message_mb * 2**20 >= 2**31:
            raise InputError("must be below 2048 (gRPC's limit)", field="max_message_mb")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InputError("give both --tls-cert and --tls-key, or neither", field="tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InputError("mutual TLS needs --tls-cert and --tls-key too", field="tls_client_ca")
        if self.address.rpartition(":")[0] == "" or not self.address.rpartition(":")[2].isdigit():
            raise InputError(f"expected host:port, got {self.address!r}", field="address")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 2**20)


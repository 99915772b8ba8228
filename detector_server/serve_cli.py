"""`rwood-serve BUNDLE`: the command line of the gRPC detector (parses flags, calls `serve`).

Examples:

    rwood-serve bundles/cifar10 --address 127.0.0.1:50051 --metrics-port 9100
    rwood-serve bundles/cifar10 --address 0.0.0.0:50051 --tls-cert srv.pem --tls-key srv.key \\
        --tls-client-ca clients-ca.pem --auth-token-file token.txt --watch

    rwood-serve bundles/cifar10 --address 0.0.0.0:50051 --workers 4 --metrics-port 9100

SIGTERM/SIGINT drain and stop; SIGHUP reloads the bundle (in every worker, or in none).
"""
from __future__ import annotations

import click

from .cli_common import Command, run_cli, setup_logging
from .server import ServeConfig, serve

__all__ = ["serve_main"]

_D = ServeConfig()  # the defaults, from the one definition


@click.command(cls=Command, context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(file_okay=False, dir_okay=True))
@click.option("--address", default=_D.address,
              help="host:port to listen on (loopback by default; port 0 picks a free one).")
@click.option("--max-batch", type=int, default=_D.max_batch, help="Most images per model call.")
@click.option("--max-wait-ms", type=float, default=_D.max_wait_ms,
              help="Longest a lone image waits for others to share its batch (0: never waits; "
                   "under load batches fill while the model is busy anyway).")
@click.option("--max-images", type=int, default=_D.max_images,
              help="Most images per request (more: INVALID_ARGUMENT).")
@click.option("--max-message-mb", type=float, default=_D.max_message_mb,
              help="Largest request in MiB (more: RESOURCE_EXHAUSTED).")
@click.option("--max-pixels", type=int, default=_D.max_pixels,
              help="Images with more pixels get an error (decompression-bomb guard).")
@click.option("--max-queue-images", type=int, default=_D.max_queue_images,
              help="Images admitted at once; requests beyond are refused UNAVAILABLE (load shedding).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_D.device,
              help="Where ONNX Runtime and FAISS run.")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime/FAISS threads in all, split evenly over the workers (default: the "
                   "cores this process may use, capped by a container's CPU limit).")
@click.option("--workers", type=int, default=_D.workers,
              help="Server processes sharing the port (SO_REUSEPORT), each with its own model "
                   "session and its share of --threads; a dead one is restarted. More than 1 when "
                   "one process cannot keep the cores busy (small models, single-image calls).")
@click.option("--decode-threads", type=int, default=_D.decode_threads, help="Image decoding threads.")
@click.option("--search", "search_params", multiple=True, metavar="NAME=VALUE",
              help="Override a search parameter of the bundle's index (repeatable; e.g. "
                   "nprobe=64): logged, since the threshold was calibrated with the bundle's.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="PEM certificate chain: serve TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM private key.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="PEM CA bundle: require client certificates signed by it (mutual TLS).")
@click.option("--auth-token-file", type=click.Path(dir_okay=False), default=None,
              help="File with a bearer token every call must carry (health checks exempt).")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on this port (off by default).")
@click.option("--metrics-host", default=_D.metrics_host, help="Where the metrics port listens.")
@click.option("--watch/--no-watch", default=_D.watch,
              help="Reload when the bundle's manifest.json changes (SIGHUP always reloads).")
@click.option("--watch-interval", "watch_interval_s", type=float, default=_D.watch_interval_s,
              help="Seconds between --watch checks.")
@click.option("--grace", "grace_s", type=float, default=_D.grace_s,
              help="On SIGTERM, seconds in-flight requests get to finish.")
@click.option("--drain-delay", "drain_delay_s", type=float, default=_D.drain_delay_s,
              help="On SIGTERM, seconds of NOT_SERVING health and UNAVAILABLE answers before the "
                   "port closes, so load balancers and clients move away; when requests were "
                   "still in progress, the answers go on until they are done and this long "
                   "after (all within --grace).")
@click.option("--max-inflight-mb", type=float, default=_D.max_inflight_mb,
              help="MiB of requests (image data and ids) held at once; beyond, Score answers "
                   "UNAVAILABLE and open streams are not read until work completes.")
@click.option("--max-calls", type=int, default=_D.max_calls,
              help="Calls at once over all connections (health checks aside); beyond, "
                   "RESOURCE_EXHAUSTED before the request is read.")
@click.option("--max-streams-per-connection", type=int, default=_D.max_streams_per_connection,
              help="Calls at once on one client connection (HTTP/2 max concurrent streams); "
                   "clients queue the rest.")
@click.option("--max-health-watches", type=int, default=_D.max_health_watches,
              help="Health Watch streams at once without a valid token; beyond, "
                   "RESOURCE_EXHAUSTED.")
@click.option("--reload-timeout", "reload_timeout_s", type=float, default=_D.reload_timeout_s,
              help="Seconds a bundle (re)load may take; a slower one (a hung file system) is "
                   "abandoned and the old model keeps serving.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve_main(bundle: str, address: str, verbose: bool, **options: object) -> None:
    """Serve the ReweightOOD detector in BUNDLE over gRPC (rwood.v1.Detector, health, reflection)."""
    setup_logging(verbose)
    run_cli(serve, address, bundle, **options)


if __name__ == "__main__":
    serve_main()

"""`python -m detector_server.probe [ADDRESS]`: exit 0 when `rwood-serve` at ADDRESS reports SERVING.

Use it where an orchestrator has no native gRPC health probe: the image's Docker HEALTHCHECK and
compose's `healthcheck` (Kubernetes has native gRPC probes; see deploy/k8s). It asks the standard
grpc.health.v1 service for `rwood.v1.Detector`, which is NOT_SERVING while the model loads and while
the server drains, so "healthy" means "can score now". Exit status: 0 SERVING, 1 anything else
(NOT_SERVING, unreachable, timeout), with one line saying which. Plaintext only: a server started
with --tls-cert needs a probe that speaks TLS (Kubernetes' gRPC probe does not either).
Imports only grpc, so a probe every few seconds costs a fraction of a second of CPU.
Test: tests/runtime/test_probe.py.
"""
from __future__ import annotations

import sys

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._proto import detector_pb2 as pb
from .cli_common import Command

__all__ = ["check_health", "probe_main", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name   # "rwood.v1.Detector"


def check_health(address: str, service: str = SERVICE_NAME, timeout: float = 2.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) of `service` at `address`, or
    "UNREACHABLE: <gRPC status>" when the call fails."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return f"UNREACHABLE: {e.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@click.command(cls=Command)
@click.argument("address", default="127.0.0.1:50051")
@click.option("--service", default=SERVICE_NAME, show_default=True,
              help="Health service name to ask about ('' for the whole server).")
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait.")
def probe_main(address: str, service: str, timeout: float) -> None:
    """Exit 0 when the detector at ADDRESS (host:port) reports SERVING, else 1."""
    status = check_health(address, service, timeout)
    click.echo(f"{address} {service or '(server)'}: {status}")
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    probe_main()

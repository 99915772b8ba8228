"""`python -m detector_server.probe`: the container health check follows the server's health service
(SERVING once loaded, NOT_SERVING while draining, UNREACHABLE once gone)."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from detector_server.probe import SERVICE_NAME, check_health, probe_main
from detector_server.server import start_background


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_follows_the_server_from_serving_to_draining_to_gone(tiny_bundle: Path) -> None:
    srv = start_background(tiny_bundle, device="cpu", threads=1, drain_delay_s=1.5, grace_s=3.0)
    target = srv.target
    try:
        result = CliRunner().invoke(probe_main, [target])
        assert result.exit_code == 0 and result.output.strip() == f"{target} {SERVICE_NAME}: SERVING"
        assert check_health(target, service="") == "SERVING"
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        deadline, status = time.monotonic() + 1.0, ""
        while time.monotonic() < deadline and status != "NOT_SERVING":
            status = check_health(target, timeout=0.5)
            time.sleep(0.05)
        assert status == "NOT_SERVING"
        result = CliRunner().invoke(probe_main, [target])
        assert result.exit_code == 1 and result.output.endswith(": NOT_SERVING\n")
        stopper.join(10)
    finally:
        srv.stop(grace=0)
    result = CliRunner().invoke(probe_main, [target, "--timeout", "0.5"])
    assert result.exit_code == 1 and "UNREACHABLE: UNAVAILABLE" in result.output


def test_probe_of_a_port_nobody_listens_on() -> None:
    status = check_health(f"127.0.0.1:{_free_port()}", timeout=0.5)
    assert status == "UNREACHABLE: UNAVAILABLE"

"""Real services for integration tests, started on 127.0.0.1 and stopped afterwards.

A service that cannot start is a test failure, never a skip: `bash scripts/setup.sh` installs them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with code {proc.returncode} at start; its log:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # waiting for a server we started to listen: start-up only
    proc.kill()
    pytest.fail(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; log: {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def _server(name: str, argv_for_port: Any, data: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """Start a server on a free port of 127.0.0.1, wait until it listens, stop it afterwards."""
    log = data / f"{name}.log"
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv_for_port(port), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_port(port, proc, name, log)
        yield port
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    exe = REPO / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        pytest.fail(f"Azurite is not installed ({exe} is missing): run `bash scripts/setup.sh`, which runs "
                    f"`npm install` in the repository")
    data = tmp_path_factory.mktemp("azurite")
    argv = lambda port: [str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",  # noqa: E731
                         str(data), "--skipApiVersionCheck", "--disableTelemetry"]
    with _server("Azurite", argv, data) as port:
        yield {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY,
               "endpoint": f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", "port": port}


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.fail(f"moto_server is not installed next to {sys.executable}: run `bash scripts/setup.sh` "
                    f"(the [s3] and [dev] extras)")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    argv = lambda port: [str(exe), "-H", "127.0.0.1", "-p", str(port)]  # noqa: E731
    with _server("moto_server", argv, tmp_path_factory.mktemp("moto"), env) as port:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "access_key_id": "testing",
               "secret_access_key": "testing", "port": port}

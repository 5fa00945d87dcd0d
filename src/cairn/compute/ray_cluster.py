"""A Ray cluster on this machine for ``RayCompute.provisioning_configuration``: a head and
``min_nodes`` worker nodes, each a ``ray start --block`` process in its own session with its own
temporary folder, every address 127.0.0.1. For a cluster of several machines use Ray's own
cluster launcher (``ray up cluster.yaml``) and attach to its head instead: Cairn does not provision
machines.

Ray may still listen on every interface of the machine even when given 127.0.0.1 (see
../shared/SERVICES.md); the machine must be on a trusted network. The dashboard is not started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT = 120.0


def ray_cli() -> str:
    found = Path(sys.executable).with_name("ray")
    if found.exists():
        return str(found)
    which = shutil.which("ray")
    if which:
        return which
    raise RuntimeError("Ray is not installed: pip install 'cairn[ray]' (ray[default])")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each stays bound until all are picked (one at a time, the
    system may hand the same port out twice, and Ray refuses two components on one port)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_node(address: str | None, cpus: int | None, log: Path, port: int | None = None,
               gpus: int | None = None, launcher: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a head (``address`` None) or a worker node; returns what ``stop_node`` needs.
    ``launcher`` is put before ``ray start`` (e.g. a namespace wrapper), ``env`` added to its
    variables."""
    temp_dir = tempfile.mkdtemp(prefix="cairn-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    manager_port, object_port, head_port, client_port = free_ports(4)
    argv = [*launcher, ray_cli(), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1", f"--node-manager-port={manager_port}",
            f"--object-manager-port={object_port}"]
    if address is None:
        argv += ["--head", f"--port={port or head_port}", "--include-dashboard=false",
                 f"--ray-client-server-port={client_port}"]
    else:
        argv += [f"--address={address}"]
    if cpus is not None:
        argv.append(f"--num-cpus={cpus}")
    if gpus is not None:
        argv.append(f"--num-gpus={gpus}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                env={**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0"})
    node = {"pid": proc.pid, "temp_dir": temp_dir, "log": str(log), "node_manager_port": manager_port}
    if address is None:
        node["address"] = f"127.0.0.1:{argv_port(argv)}"
    return node


def argv_port(argv: list[str]) -> int:
    return int(next(a for a in argv if a.startswith("--port=")).split("=", 1)[1])


def wait_ready(address: str, nodes: int, timeout: float = READY_TIMEOUT, show: Any = None) -> list[dict[str, Any]]:
    """Wait until the head answers and ``nodes`` nodes are alive; returns Ray's node list."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:  # the head's port first: ray.init would retry for a long time on its own
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray head at {address} did not start within {timeout:g} s") from None
            time.sleep(0.25)  # waiting for another process to open a port: nothing to wake us
    alive = cluster_nodes(address)
    while len(alive) < nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(alive)} of {nodes} Ray nodes joined within {timeout:g} s")
        if show:
            show(f"{len(alive)} of {nodes} nodes up")
        time.sleep(0.5)
        alive = cluster_nodes(address)
    return alive


_NODES = """
import json, sys
import ray
ray.init(address=sys.argv[1], namespace="cairn", log_to_driver=False, logging_level="ERROR", configure_logging=False)
print(json.dumps([{k: n.get(k) for k in ("NodeID", "Alive", "NodeManagerAddress", "NodeManagerPort", "Resources")}
                  for n in ray.nodes()]))
"""


def cluster_nodes(address: str, timeout: float = 60) -> list[dict[str, Any]]:
    """The alive nodes of the cluster at ``address``. Asked from a short-lived process: a process
    that becomes a Ray driver stays one (threads, a raylet connection that may die with its node)."""
    import json

    probe(address)
    try:
        out = subprocess.run([sys.executable, "-c", _NODES, address], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    except subprocess.TimeoutExpired:
        raise ConnectionError(f"the Ray cluster at {address} did not answer within {timeout:g} s") from None
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
    if out.returncode != 0 or not lines:
        detail = (out.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConnectionError(f"cannot list the nodes of the Ray cluster at {address}: {detail}")
    return [n for n in json.loads(lines[-1]) if n.get("Alive")]


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and an empty SETTINGS


def probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at ``address``, or something other than a Ray head does (a
    web server, Ray's dashboard port): ray.init would wait on either for a long time. A Ray head's
    GCS serves gRPC, whose HTTP/2 server answers a client's preface with a SETTINGS frame."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        raise ConnectionError(f"no Ray head answers at {address} ({exc})") from None
    if len(head) < 9 or head[3] != 0x04:  # the frame type of SETTINGS
        raise ConnectionError(f"what listens at {address} is not a Ray head (it does not speak gRPC: the dashboard's "
                              f"port, or another server?); give the head's address, the port `ray start --head "
                              f"--port=...` was given (6379 by default)")


def _this_machine() -> set[str]:
    names = {"127.0.0.1", "localhost", "::1"}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return names


def same_cluster(current: str, address: str) -> bool:
    """Ray reports a head given as 127.0.0.1 by the machine's routable address: same port, and the
    same host or both this machine."""
    (h1, p1), (h2, p2) = current.rsplit(":", 1), address.rsplit(":", 1)
    if p1 != p2:
        return False
    if h1 == h2:
        return True
    if h2.startswith("127.") or h2 in ("localhost", "::1"):  # asked for this machine: Ray names it otherwise
        return True
    local = _this_machine()
    try:
        return socket.gethostbyname(h1) == socket.gethostbyname(h2) or (h1 in local and h2 in local)
    except OSError:
        return False


_RECONNECT = "RAY_gcs_rpc_server_reconnect_timeout_s"


def connect(address: str, switch: bool = True) -> None:
    """Make this process a Ray driver of the cluster at ``address``. A process drives one cluster
    at a time: with ``switch`` it leaves another one first, else that is an error."""
    import ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if same_cluster(current, address):
            return
        try:
            probe(current, timeout=1.0)
        except ConnectionError:
            switch = True  # the cluster this process drove is gone: nothing to keep
        if not switch:
            raise RuntimeError(f"this process already drives the Ray cluster at {current}; one agent drives one "
                               f"Ray cluster at a time")
        ray.shutdown()
    # A driver whose head stops answering exits after 60 s (Ray's gcs_rpc_server_reconnect_timeout_s),
    # and the driver is the agent: its local steps would go with it. It waits instead; its Ray steps
    # find the head gone (RayCompute._get) and fail or run again, saying so. Read as the driver
    # starts: not left for the steps this process starts.
    previous = os.environ.get(_RECONNECT)
    os.environ[_RECONNECT] = str(10 ** 9)
    try:
        ray.init(address=address, namespace="cairn", log_to_driver=False, logging_level="WARNING",
                 configure_logging=False)
    finally:
        if previous is None:
            os.environ.pop(_RECONNECT, None)
        else:
            os.environ[_RECONNECT] = previous


def stop_node(node: dict[str, Any]) -> None:
    """Stop one node started by ``start_node`` (its whole session: raylet, GCS, workers)."""
    pid = int(node["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            break
    deadline = time.monotonic() + 10
    while _kill_session_leftovers(node["temp_dir"]) and time.monotonic() < deadline:
        time.sleep(0.2)  # the killed processes must be gone before their folder can stay removed
    shutil.rmtree(node["temp_dir"], ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_session_leftovers(temp_dir: str) -> int:
    """Ray daemonises some processes out of the session: find them by their temporary folder, given
    as an option's value (``--temp-dir=...``, ``--log_dir=...``: a user's ``tail -f`` of a log there
    is not Ray's), and kill them; returns how many were still alive."""
    found = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if f"={temp_dir}" in cmdline and _alive(int(entry.name)):
            found += 1
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return found

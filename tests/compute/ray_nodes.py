"""What the Ray tests share: a head and a second node started for a module, and whether a process
is gone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cairn.compute.ray_cluster import start_node, stop_node, wait_ready


@contextmanager
def head_and_node(logs: Path, head_cpus: int, **second: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """A head with ``head_cpus`` and a second node (``start_node``'s ``second`` arguments), both
    joined; stopped afterwards."""
    head = start_node(None, cpus=head_cpus, log=logs / "head.log")
    other = None
    try:
        other = start_node(head["address"], log=logs / "second.log", **second)
        wait_ready(head["address"], 2)
        yield head, other
    finally:
        for node in (other, head):
            if node is not None:
                stop_node(node)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True

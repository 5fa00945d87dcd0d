"""Waiting for a file descriptor to become readable, without ``select.select``'s limit: it refuses
descriptors numbered 1024 and above, which a process with many files open (a notebook that opened
many workspaces, a test session) reaches."""

from __future__ import annotations

import select
from typing import Any

_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def wait_readable(fileobj: Any, timeout: float | None) -> bool:
    """Whether ``fileobj`` (a descriptor or an object with ``fileno()``) has something to read, or
    has reached its end, within ``timeout`` seconds (None: wait as long as it takes)."""
    poller = select.poll()
    poller.register(fileobj, _READABLE)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

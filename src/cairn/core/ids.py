"""Identifiers: sortable by creation time, safe in paths and URLs."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_ID_RE = re.compile(r"^[a-z]{2,5}_[0-9a-z]{18}$")


def _base36(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A new id like ``run_0kz3...``: a millisecond timestamp then random bits."""
    stamp = _base36(int(time.time() * 1000), 9)
    rand = _base36(int.from_bytes(os.urandom(6), "big"), 9)
    return f"{prefix}_{stamp}{rand}"


def is_valid_id(value: str) -> bool:
    """True when ``value`` looks like an id made by :func:`new_id` (safe to put in a path)."""
    return bool(_ID_RE.match(value))

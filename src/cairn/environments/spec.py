"""Canonical environment specs. The digest is part of every step fingerprint."""

from __future__ import annotations

import sys
from typing import Any

from cairn.core.digests import digest_json


def current_interpreter_spec() -> dict[str, Any]:
    """The default environment: the interpreter Cairn runs in, as it is."""
    return {"kind": "current-interpreter", "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "interpreter_path": None, "environment_variables": {}}


def spec_digest(spec: dict[str, Any]) -> str:
    """Digest of what decides the environment's behaviour (its name is not part of it)."""
    return digest_json({k: v for k, v in spec.items() if k != "name"})


def interpreter_for(spec: dict[str, Any]) -> str:
    return spec.get("interpreter_path") or sys.executable

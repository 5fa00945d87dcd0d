"""A step's fingerprint: a digest of named parts, kept with the step run so it can be explained."""

from __future__ import annotations

from typing import Any

from cairn.core.digests import digest_json
from cairn.core.spec import StepSpec


def fingerprint_parts(step: StepSpec, input_digests: dict[str, str]) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "kind": step.kind,
        "script": step.script_name,
        "snapshot": step.snapshot,
        "arguments": step.argument_template(),
        "params": dict(step.params),
        "environment": step.environment_digest,
        "environment_variables": dict(step.environment_variables),
        "version": step.version,
        # where an output is committed is part of what the step does (a reused step wrote elsewhere)
        "outputs": {o.name: [o.datastore, o.destination, bool(o.overwrite)] if o.destination else o.datastore
                    for o in step.outputs},
    }
    for name in sorted(input_digests):
        parts[f"input:{name}"] = input_digests[name]
    return parts


def fingerprint(parts: dict[str, Any]) -> str:
    return digest_json(parts)


def differing_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the parts that differ, in a stable order."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]

"""A step's fingerprint: a digest of named parts, kept with the step run so it can be explained."""

from __future__ import annotations

from typing import Any

from cairn.core.digests import canonical_json, digest_bytes, digest_json
from cairn.core.spec import InputSpec, StepSpec
from cairn.runner.job import InputLocation


def fingerprint_parts(step: StepSpec, digests: dict[str, str]) -> dict[str, Any]:
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
    for name in sorted(digests):
        parts[f"input:{name}"] = digests[name]
    return parts


def fingerprint(parts: dict[str, Any]) -> str:
    return digest_json(parts)


def fingerprint_and_text(parts: dict[str, Any]) -> tuple[str, str]:
    """``fingerprint(parts)``, and the JSON it is the digest of (what a reuse records of its parts:
    made once, not once more to be recorded)."""
    text = canonical_json(parts)
    return digest_bytes(text), text.decode()


def definition_of(parts: dict[str, Any]) -> str:
    """The fingerprint without its inputs: what a step is, whatever it reads (the store keeps it
    with each cache entry; store migration 0006 has a frozen copy of this formula)."""
    return digest_json({k: v for k, v in parts.items() if not k.startswith("input:")})


def input_digests(step: StepSpec, inputs: list[InputLocation]) -> dict[str, str]:
    """What each input gives the step's fingerprint: its content's digest, and how the step reads it
    where that is more than its files (a dataset's transformations and parse options, an output
    read as a table): the same files read otherwise give another result."""
    digests = {i.name: i.digest for i in inputs}
    for d in step.dataset_inputs:
        reading = {k: v for k, v in d.definition.items() if k not in ("kind", "paths")}
        if reading or d.kind != "file":  # (a plain file dataset keeps the fingerprint it had)
            digests[d.name] = digest_json([d.content_digest, d.kind, reading])
    for i in step.inputs:
        if i.read_as:
            digests[i.name] = digest_json([digests[i.name], i.read_as])
    # and where and how the step gets it, when not as by default: another path in its arguments, a
    # private copy instead of the read-only original (default inputs keep the fingerprint they had)
    for i in (*step.inputs, *step.dataset_inputs):
        default = "mount" if isinstance(i, InputSpec) else "direct"
        if i.mode != default or i.path_on_compute:
            digests[i.name] = digest_json([digests[i.name], i.mode, i.path_on_compute])
    return digests


def differing_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the parts that differ, in a stable order."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]

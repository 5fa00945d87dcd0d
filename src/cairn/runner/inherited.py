"""What a step inherits from its agent's environment (the variables its run configuration and
environment do not set), recorded once per distinct environment in ``.cairn/inherited/`` so that
``cairn debug`` recreates the step with them. A variable whose name looks like it holds a secret is
kept as a digest of its value only: debug says when the shell's value is another."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

FOLDER = "inherited"  # under the workspace's .cairn/
SECRET_LOOKING = re.compile(r"KEY|SECRET|TOKEN|PASS|CRED|AUTH|COOKIE|SESSION|PRIVATE|SIGNATURE|CERT", re.IGNORECASE)


def value_digest(name: str, value: str) -> str:
    return hashlib.blake2b(f"{name}={value}".encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def record(dot: str | os.PathLike[str], env: dict[str, str]) -> str:
    """Keep ``env`` (once: the file is named by its content) and return its id; for this user only."""
    kept = {k: {"digest": value_digest(k, v)} if SECRET_LOOKING.search(k) else v for k, v in env.items()}
    text = json.dumps(kept, sort_keys=True, ensure_ascii=False)
    ident = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    path = Path(dot) / FOLDER / f"{ident}.json"
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        temporary = path.with_name(f".{ident}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        os.replace(temporary, path)  # whole or not at all
    return ident


def load(dot: str | os.PathLike[str], ident: str) -> dict[str, str | dict[str, str]] | None:
    """A record kept by ``record``, or None (gone, or never kept)."""
    if not re.fullmatch(r"[0-9a-f]{32}", ident or ""):
        return None
    try:
        return json.loads((Path(dot) / FOLDER / f"{ident}.json").read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return None

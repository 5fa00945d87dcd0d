"""What a step inherits from its agent's environment (the variables its run configuration and
environment do not set), recorded once per distinct environment in ``.cairn/inherited/`` so that
``cairn debug`` recreates the step with them. A variable that looks like it holds a secret (by its
name, or a password in a URL, a connection string) is kept as a salted digest of its value only:
debug says when the shell's value is another."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

FOLDER = "inherited"  # under the workspace's .cairn/
# names and values that may hold a secret (a key, a password in a URL, a connection string): kept as
# digests only
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASS|PWD|CRED|AUTH|COOKIE|SESSION|PRIVATE|SIGNATURE|CERT|SAS|"
                         r"URL|URI|DSN|CONNECTION|CONN_STR|PAT$|_PAT_|WEBHOOK|PROXY|JWT|BEARER|OTP", re.IGNORECASE)
SECRET_VALUE = re.compile(r"://[^/@\s]+@|AccountKey=|SharedAccessSignature|[?&]sig=|-----BEGIN|"
                          r"\b(password|passwd|pwd|secret|token)\b[\"']?\s*[:=]|\b(Basic|Bearer)\s+\S{8,}",
                          re.IGNORECASE)
NOT_SECRET = {"PWD", "OLDPWD"}  # the shell's folders


def looks_secret(name: str, value: str) -> bool:
    return name not in NOT_SECRET and bool(SECRET_NAME.search(name) or SECRET_VALUE.search(value))


def value_digest(name: str, value: str, salt: str) -> str:
    """A salted digest of a value that is not kept: it tells whether another shell's value is the
    same (the salt is kept beside it: a weak password can still be guessed from a copied record)."""
    return hashlib.blake2b(f"{name}={value}".encode("utf-8", "surrogateescape"), digest_size=16,
                           key=bytes.fromhex(salt)).hexdigest()


_write_lock = threading.Lock()


def record(dot: str | os.PathLike[str], env: dict[str, str]) -> str:
    """Keep ``env`` (once per distinct set) and return its id; for this user only. Secret-looking
    values are kept as salted digests (a random salt per record). The id is a digest of the set
    with those values digested under the workspace's key (``id-key`` beside the records), never in clear."""
    key = _id_key(dot)
    ident = hashlib.blake2b(json.dumps(sorted((k, value_digest(k, v, key) if looks_secret(k, v) else v)
                                              for k, v in env.items()), ensure_ascii=False)
                            .encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    path = Path(dot) / FOLDER / f"{ident}.json"
    with _write_lock:
        if path.exists():
            return ident
        salt = os.urandom(16).hex()
        kept = {k: {"digest": value_digest(k, v, salt)} if looks_secret(k, v) else v for k, v in env.items()}
        text = json.dumps({"salt": salt, "variables": kept}, sort_keys=True, ensure_ascii=False)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{ident}.", suffix=".tmp")  # 0600
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        os.replace(temporary, path)  # whole or not at all (another agent's equal record may win: the same)
    return ident


def _id_key(dot: str | os.PathLike[str]) -> str:
    """A random key of this workspace's records (made once, for this user only)."""
    path = Path(dot) / FOLDER / "id-key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".id-key.", suffix=".tmp")
        with open(fd, "w") as f:
            f.write(os.urandom(16).hex())
        try:
            os.link(temporary, path)  # the first one made wins: every record's id uses the same key
        except FileExistsError:
            pass
        os.unlink(temporary)
        return path.read_text().strip()


def load(dot: str | os.PathLike[str], ident: str) -> tuple[dict[str, str | dict[str, str]], str] | None:
    """A record kept by ``record`` (its variables, and the key of its digests), or None (gone, or
    never kept)."""
    if not re.fullmatch(r"[0-9a-f]{32}", ident or ""):
        return None
    try:
        kept = json.loads((Path(dot) / FOLDER / f"{ident}.json").read_text(encoding="utf-8", errors="surrogateescape"))
        return kept["variables"], kept["salt"]  # (records of this form only: none older was released)
    except (OSError, ValueError, KeyError, TypeError):
        return None

"""A content-addressed object store on a local folder: one file per distinct content."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cairn.core.digests import PREFIX, digest_bytes


class ObjectStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        hexpart = digest[len(PREFIX):] if digest.startswith(PREFIX) else digest
        if len(hexpart) < 8 or not all(c in "0123456789abcdef" for c in hexpart):
            raise ValueError(f"not an object digest: {digest!r}")
        return self.root / hexpart[:2] / hexpart[2:]

    def has(self, digest: str) -> bool:
        return self.path_for(digest).exists()

    def put_file(self, src: str | os.PathLike[str], digest: str) -> Path:
        """Store ``src`` under ``digest`` (already computed by the caller) unless present."""
        dest = self.path_for(digest)
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)  # atomic: a reader never sees half an object
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def put_bytes(self, data: bytes) -> str:
        digest = digest_bytes(data)
        dest = self.path_for(digest)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        return digest

    def read_bytes(self, digest: str) -> bytes:
        return self.path_for(digest).read_bytes()

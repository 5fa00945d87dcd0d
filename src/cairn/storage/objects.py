"""A content-addressed object store on a local folder: one file per distinct content."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from cairn.core.digests import PREFIX, digest_bytes

_HEX = re.compile(r"[0-9a-f]{8,}")


class ObjectStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._root = str(self.root)

    def _location(self, digest: str) -> str:
        """The object's path as a string (a snapshot of 10,000 files asks 10,000 times: no pathlib)."""
        hexpart = digest[len(PREFIX):] if digest.startswith(PREFIX) else digest
        if not _HEX.fullmatch(hexpart):
            raise ValueError(f"not an object digest: {digest!r}")
        return f"{self._root}/{hexpart[:2]}/{hexpart[2:]}"

    def path_for(self, digest: str) -> Path:
        return Path(self._location(digest))

    def has(self, digest: str) -> bool:
        return os.path.exists(self._location(digest))

    def put_file(self, src: str | os.PathLike[str], digest: str) -> Path | None:
        """Store ``src`` under ``digest`` (already computed by the caller) unless present. Returns
        the stored path, or None when the object was already there."""
        location = self._location(digest)
        if os.path.exists(location):
            return None
        dest = Path(location)
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

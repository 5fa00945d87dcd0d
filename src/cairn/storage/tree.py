"""Content digest of an output folder (or file): names, sizes and bytes of everything in it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cairn.core.digests import digest_file, digest_json


@dataclass(frozen=True)
class TreeDigest:
    digest: str
    size: int
    file_count: int


def digest_tree(path: str | os.PathLike[str]) -> TreeDigest:
    root = Path(path)
    if root.is_file():
        st = root.stat()
        return TreeDigest(digest_json({"file": digest_file(root)}), st.st_size, 1)
    rows: list[list[object]] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            st = os.stat(full)
            size += st.st_size
            rows.append([rel, st.st_size, digest_file(full)])
    rows.sort()
    return TreeDigest(digest_json({"tree": rows}), size, len(rows))

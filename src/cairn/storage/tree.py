"""Content digest of an output folder (or file): names, sizes and bytes of everything in it.

Also a stat signature (names, sizes, mtimes; no reading) to notice cheaply that committed
bytes were changed in place after the fact.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cairn.core.digests import content_digest_file, digest_bytes, digest_json


@dataclass(frozen=True)
class TreeDigest:
    digest: str
    size: int
    file_count: int
    stat_signature: str


def _files(root: Path) -> list[tuple[str, str]]:
    """(relative POSIX path, absolute path) of every file or symlink under root, sorted."""
    return _walk(root)[0]


def _walk(root: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``_files``, and the relative POSIX paths of the empty folders under root (sorted): a
    consumer may list them, so they are part of what an output is. What ``os.walk`` finds, through
    ``scandir`` alone (about twice as fast on the small outputs reuse checks one by one): symbolic
    links are listed as files, never followed (no loops, no escapes); a folder that cannot be
    listed is left out."""
    top = os.fspath(root)
    if not os.path.isdir(top):
        return [("", top)], []
    found: list[tuple[str, str]] = []
    empty: list[str] = []
    folders = [(top, "")]
    while folders:
        folder, rel_dir = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        if not entries and rel_dir:
            empty.append(rel_dir)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                real_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_folder = False
            if real_folder:
                folders.append((entry.path, rel))
            else:
                found.append((rel, entry.path))
    found.sort()
    empty.sort()
    return found, empty


@dataclass(frozen=True)
class TreeEntries:
    """A folder as it must be rebuilt elsewhere: its regular files (relative path, absolute path),
    its symbolic links (relative path, target; kept as links, never followed) and its empty folders."""

    files: list[tuple[str, str]]
    links: list[tuple[str, str]]
    folders: list[str]


def tree_entries(root: str | os.PathLike[str]) -> TreeEntries:
    files, links, folders = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*filenames, *dirnames]:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            if os.path.islink(full):
                links.append((rel, os.readlink(full)))
            elif name in filenames:
                files.append((rel, full))
        if not dirnames and not filenames and rel_dir != ".":
            folders.append(rel_dir.replace(os.sep, "/"))
    return TreeEntries(sorted(files), sorted(links), sorted(folders))


def _entry(full: str) -> tuple[int, int, str]:
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):  # a link is its target text (a broken link is not an error)
        return 0, st.st_mtime_ns, digest_bytes(b"symlink:" + os.readlink(full).encode())
    return st.st_size, st.st_mtime_ns, content_digest_file(full)


TreeWalk = tuple[list[tuple[str, str]], list[str]]  # ``_walk``'s: files (relative, absolute), empty folders


def walk_tree(path: str | os.PathLike[str]) -> TreeWalk:
    """What is in a folder (or the file itself), for ``digest_tree`` and ``stat_summary`` to share."""
    return _walk(Path(path))


def digest_tree(path: str | os.PathLike[str], walked: TreeWalk | None = None) -> TreeDigest:
    """``walked``: ``walk_tree(path)``, if it was just walked (and nothing changed since)."""
    rows, stats, size = [], [], 0
    files, empty = walked or _walk(Path(path))
    for rel, full in files:
        file_size, mtime, digest = _entry(full)
        size += file_size
        rows.append([rel, file_size, digest])
        stats.append([rel, file_size, mtime])
    folders = {"folders": empty} if empty else {}  # (an output without empty folders keeps its old digest)
    # the stat signature always names its folders: one recorded from now on never equals the older
    # files-only form, which stat_signatures still accepts for outputs recorded before
    return TreeDigest(digest_json({"tree": rows, **folders}), size, len(rows), _signature(stats, empty))


def stat_summary(walked: TreeWalk) -> tuple[str, int, int]:
    """(stat signature, bytes, files) of a walked tree without reading a byte: what ``digest_tree``
    will say of these three while nothing changes."""
    stats: list[list[object]] = []
    size = 0
    files, empty = walked
    for rel, full in files:
        st = os.lstat(full)
        file_size = 0 if stat.S_ISLNK(st.st_mode) else st.st_size
        size += file_size
        stats.append([rel, file_size, st.st_mtime_ns])
    return _signature(stats, empty), size, len(stats)


def stat_signature(path: str | os.PathLike[str]) -> str:
    return stat_signatures(path)[0]


def stat_signatures(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The stat signature, and the files-only form recorded before empty folders counted (an
    output recorded then is still itself if its files are)."""
    current, files_only = _signature_forms(path)
    return current, files_only


def stat_signature_matches(path: str | os.PathLike[str], recorded: str) -> bool:
    """Whether ``path`` still has the ``recorded`` stat signature, in either form (the older form
    is digested only when the current one differs: reuse asks this of every output it would use)."""
    return any(form == recorded for form in _signature_forms(path))


def _signature_forms(path: str | os.PathLike[str]) -> Iterator[str]:
    """``path``'s stat signature, then its older files-only form (made only if asked for)."""
    stats: list[list[object]] = []
    files, empty = _walk(path)
    for rel, full in files:
        st = os.lstat(full)
        stats.append([rel, 0 if stat.S_ISLNK(st.st_mode) else st.st_size, st.st_mtime_ns])
    yield _signature(stats, empty)
    yield digest_json({"stat": stats})


def _signature(stats: list[list[object]], empty: list[str]) -> str:
    return digest_json({"stat": stats, "folders": empty})


def make_read_only(path: str | os.PathLike[str]) -> None:
    """Committed outputs are read-only: a later step that writes to its input fails loudly
    (except as root, which is why reuse also checks the stat signature)."""
    for _rel, full in _files(Path(path)):
        if not os.path.islink(full):
            os.chmod(full, stat.S_IMODE(os.lstat(full).st_mode) & ~0o222)

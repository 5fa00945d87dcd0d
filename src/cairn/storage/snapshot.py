"""Snapshots of a source directory: content-addressed, ignore-file aware, stat-cached.

A file whose (size, mtime, inode) match the stat cache is not read again; the caller loads and
saves the cache (the store owns it), so this module does no SQL. A file modified just before the
walk is not cached: an edit within the same tick of its filesystem's clock, at the same size,
would leave its stat as it was (``changed_too_recently``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cairn.core.digests import changed_too_recently, digest_file, digest_json
from cairn.core.errors import SnapshotTooLargeError, UserInputError
from cairn.storage.objects import ObjectStore
from cairn.storage.paths import real_path

IGNORE_FILES = (".cairnignore", ".amlignore", ".gitignore")
ALWAYS_IGNORED = (".git", ".cairn", "__pycache__", ".ipynb_checkpoints", ".cairn_debug")
DEFAULT_MAX_FILES = 25_000
DEFAULT_MAX_BYTES = 300_000_000  # 300 MB, as Azure ML's snapshot limit


def snapshot_limits(config: dict) -> tuple[int, int]:
    """(max files, max bytes) of a snapshot: ``$CAIRN_SNAPSHOT_MAX_FILES``/``_BYTES`` of the process
    that submits, else the workspace's ``config.json`` (``snapshot``), else the defaults."""
    limits = config.get("snapshot", {})
    return (int(os.environ.get("CAIRN_SNAPSHOT_MAX_FILES", limits.get("max_files", DEFAULT_MAX_FILES))),
            int(os.environ.get("CAIRN_SNAPSHOT_MAX_BYTES", limits.get("max_bytes", DEFAULT_MAX_BYTES))))

StatKey = tuple[int, int, int]  # size, mtime_ns, inode


@dataclass(frozen=True)
class SnapshotEntry:
    path: str  # POSIX, relative to the source directory
    digest: str
    size: int
    executable: bool


@dataclass
class Snapshot:
    digest: str
    entries: list[SnapshotEntry]
    manifest: dict
    ignore_file: str | None
    stat_updates: dict[str, tuple[StatKey, str]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


Patterns = tuple[tuple[Any, bool], ...]  # (compiled regex, include), in the file's order
Specs = tuple[Patterns, Patterns]  # (rules for folders: all of the file's; rules for files: not the folder-only ones)


def _specs(path: str) -> Specs:
    """An ignore file's rules. A folder-only rule (``models/``, ``!models/``) decides about the
    folder, never about the files in it."""
    import pathspec

    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    files_only = [ln for ln in lines if not ln.rstrip().endswith("/")]

    def compiled(rules: list[str]) -> Patterns:
        spec = pathspec.GitIgnoreSpec.from_lines(rules)
        return tuple((p.regex, bool(p.include)) for p in spec.patterns if p.include is not None)

    return compiled(lines), compiled(files_only)


def _decision(patterns: Patterns, rel: str) -> bool | None:
    """What the last matching rule says about ``rel`` (True: ignore), or None. For a file, as git
    reads them, only rules that name the file itself: one that matched a folder above it decided
    about that folder, which the walk has already entered (pathspec would let ``!data``
    re-include data/x.txt, and ``logs/*`` ignore logs/keep/b.log)."""
    folder = rel.endswith("/")
    decided = None
    for regex, include in patterns:
        m = regex.search(rel)  # as pathspec matches
        if m is not None and (folder or m.groupdict().get("ps_d") is None):
            decided = include
    return decided


def _ignore_spec(source: str) -> tuple[Specs | None, str | None]:
    for name in IGNORE_FILES:
        f = os.path.join(source, name)
        if os.path.isfile(f):
            return _specs(f), name
    return None, None


Rules = tuple[tuple[str, Specs], ...]  # (folder relative to the source, its ignore rules), outermost first


def _nested_names(ignore_file: str | None) -> tuple[str, ...]:
    """The ignore files a subfolder may have: those of the source's own kind or before it in
    IGNORE_FILES (a source that chose .cairnignore does not take git's rules from its subfolders)."""
    return IGNORE_FILES[:IGNORE_FILES.index(ignore_file) + 1] if ignore_file else IGNORE_FILES


def _nested_spec(abs_dir: str, names: tuple[str, ...], present: set[str] | None = None) -> Specs | None:
    """A subfolder's own ignore file: the first of ``names`` it has (``present``: its entries' names,
    when known, to spare a stat each)."""
    for name in names:
        if present is not None and name not in present:
            continue
        path = os.path.join(abs_dir, name)
        if os.path.isfile(path):
            return _specs(path)
    return None


def _ignored(rules: Rules, rel: str) -> bool:
    """As git decides: the innermost ignore file with a rule for the path (a ``!`` rule re-includes);
    ``rel`` ends with "/" for a folder."""
    folder = rel.endswith("/")
    for base, (for_folders, for_files) in reversed(rules):
        spec = for_folders if folder else for_files
        decided = _decision(spec, rel[len(base):])
        if decided is not None:
            return bool(decided)
    return False


def never_snapshotted(source: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder``, inside ``source``, is left out of every snapshot of ``source`` (a name
    always ignored, or an ignore file's rule for it or a folder above it), as ``_walk`` decides."""
    source, folder = os.path.abspath(source), os.path.abspath(folder)
    spec, ignore_file = _ignore_spec(source)
    names = _nested_names(ignore_file)
    rules: Rules = (("", spec),) if spec is not None else ()
    rel_dir, abs_dir = "", source
    for part in Path(os.path.relpath(folder, source)).parts:
        if part in ALWAYS_IGNORED or (rules and _ignored(rules, f"{rel_dir}{part}/")):
            return True
        rel_dir, abs_dir = f"{rel_dir}{part}/", os.path.join(abs_dir, part)
        inner = _nested_spec(abs_dir, names) if os.path.isdir(abs_dir) else None
        if inner is not None:
            rules = (*rules, (rel_dir, inner))
    return False


def snapshot_folders(source: str | os.PathLike[str]) -> set[str]:
    """The real paths of the folders a snapshot of ``source`` takes files from (links followed)."""
    src = os.fspath(source)
    spec, ignore_file = _ignore_spec(src)
    walked: set[str] = set()
    _walk(src, spec, ignore_file, walked=walked)
    return walked


def _walk(source: str, spec: Specs | None, ignore_file: str | None, exclude: frozenset[str] = frozenset(),
          max_files: int = DEFAULT_MAX_FILES, walked: set[str] | None = None
          ) -> tuple[list[tuple[str, os.stat_result, str]], list[str], str]:
    """The files to snapshot, the folders with nothing in them (a step may expect a folder to be
    there), and why the walk stopped early ("" if it did not: past ``max_files`` files, or four
    times as many folders).
    As git does, an ignore file in a subfolder applies below it. Symbolic links to folders are
    followed (their files are snapshotted under each path that leads to them), but never back into
    a folder above (a loop); folders in ``exclude`` (real paths) are left out."""
    found: list[tuple[str, os.stat_result, str]] = []
    empty: list[str] = []
    linked = ""  # said when the walk stops early: links may be why
    nested = _nested_names(ignore_file)
    root = real_path(source)
    stack: list[tuple[str, str, Rules, frozenset[str], str]] = [
        ("", source, (("", spec),) if spec is not None else (), frozenset({root}), root)]
    folders = 0
    while stack:
        rel_dir, abs_dir, rules, above, real_dir = stack.pop()
        if walked is not None:
            walked.add(real_dir)
        with os.scandir(abs_dir) as it:
            entries = list(it)
        if rel_dir:
            inner = _nested_spec(abs_dir, nested, {e.name for e in entries})
            if inner is not None:
                rules = (*rules, (rel_dir, inner))
        for entry in entries:
            if entry.name in ALWAYS_IGNORED:
                continue
            rel = f"{rel_dir}{entry.name}"
            if entry.is_dir():
                if rules and _ignored(rules, rel + "/"):
                    continue
                if not entry.name.isascii():  # what is below it is named through it
                    _checked_name(source, rel, ignore_file)
                if entry.is_symlink():
                    real = real_path(entry.path)
                    linked = " (a symbolic link to a folder counts what it holds once for each path to it)"
                else:  # below a real folder, a folder's real path is its name there
                    real = os.path.join(real_dir, entry.name)
                if real in above or real in exclude:
                    continue
                folders += 1
                if folders > 4 * max_files:  # a limit of its own: links may lead to the same folders many ways
                    return found, empty, f"more than {4 * max_files} folders{linked}"
                stack.append((rel + "/", entry.path, rules, above | {real}, real))
            elif entry.is_file():  # follows a symlink to a file: its content is snapshotted
                if rules and _ignored(rules, rel):
                    continue
                if not entry.name.isascii():  # (a C check: only other names pay for the UTF-8 one)
                    _checked_name(source, rel, ignore_file)
                found.append((rel, entry.stat(), entry.path))
                if len(found) > max_files:
                    return found, empty, f"more than {max_files} files{linked}"
        if rel_dir and not entries:  # nothing at all in it (a folder of ignored files is not recorded)
            empty.append(_checked_name(source, rel_dir.rstrip("/"), ignore_file))
    found.sort()
    empty.sort()
    return found, empty, ""


def _checked_name(source: str, rel: str, ignore_file: str | None) -> str:
    """``rel``, if it is a name a manifest can hold (UTF-8)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(
            f"{os.path.join(source, rel)!r} has a name that is not valid UTF-8, which a snapshot cannot record: "
            f"rename it, or list it in {os.path.join(source, ignore_file or '.cairnignore')!r} (gitignore syntax) "
            f"if the step does not need it") from None
    return rel


def take_snapshot(
    source: str | os.PathLike[str],
    objects: ObjectStore,
    stat_cache: dict[str, tuple[StatKey, str]],
    max_files: int = DEFAULT_MAX_FILES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    is_recorded: Callable[[str], bool] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Snapshot:
    """Snapshot ``source`` into ``objects`` (the folders in ``exclude``, real paths, left out:
    registered local datastores hold data, not code).

    ``stat_cache`` maps absolute file paths to ((size, mtime_ns, inode), digest); entries that
    had to be (re)hashed are returned in ``Snapshot.stat_updates`` for the caller to save.
    """
    src = os.fspath(source)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory {src!r} does not exist or is not a directory")
    spec, ignore_file = _ignore_spec(src)
    try:
        src.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"the source folder {src!r} has a name that is not valid UTF-8, which a run cannot "
                             f"record: rename it") from None
    walked_at = time.time_ns()
    files, empty, cut_short = _walk(src, spec, ignore_file, exclude, max_files)
    total = sum(st.st_size for _, st, _ in files)
    if cut_short or len(files) > max_files or total > max_bytes:
        if len(files) > max_files or cut_short:  # too many files: name the folders that hold most of them
            counts: dict[str, int] = {}
            for rel, _, _ in files:
                top = rel.split("/", 1)[0] + "/" if "/" in rel else "(top level)"
                counts[top] = counts.get(top, 0) + 1
            busiest = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:5]
            listing = ("Folders with the most files: " + ", ".join(f"{k} ({v} files)" for k, v in busiest)
                       if busiest else "It has no files, only folders")
        else:
            largest = sorted(files, key=lambda f: f[1].st_size, reverse=True)[:5]
            listing = "Largest files: " + ", ".join(f"{rel} ({st.st_size / 1e6:.1f} MB)" for rel, st, _ in largest)
        use = ignore_file or ".cairnignore"
        how_many = f"{cut_short} (the walk stopped there)" if cut_short else f"{len(files)} files and {total / 1e6:.1f} MB"
        raise SnapshotTooLargeError(
            f"source directory {src!r} has {how_many}; the "
            f"snapshot limit is {max_files} files and {max_bytes / 1e6:.0f} MB. {listing}. Put data in a "
            f"datastore or list what the step does not need in {os.path.join(src, use)!r} (gitignore syntax).")
    entries: list[SnapshotEntry] = []
    updates: dict[str, tuple[StatKey, str]] = {}
    for rel, st, abspath in files:
        key: StatKey = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = stat_cache.get(abspath)
        if cached is not None and tuple(cached[0]) == key:
            digest = cached[1]
        else:
            digest = digest_file(abspath)
            if not changed_too_recently(st, walked_at):  # (read again next time)
                updates[abspath] = (key, digest)
        entries.append(SnapshotEntry(rel, digest, st.st_size, bool(st.st_mode & stat_mod.S_IXUSR)))
    manifest: dict[str, Any] = {"files": [[e.path, e.digest, e.size, e.executable] for e in entries]}
    if empty:  # only then: a snapshot without empty folders keeps the digest it always had
        manifest["folders"] = empty
    digest = digest_json(manifest)
    if updates or is_recorded is None or not is_recorded(digest):  # an unchanged snapshot's objects are stored
        for (_rel, _st, abspath), entry in zip(files, entries, strict=True):
            objects.put_file(abspath, entry.digest)  # a no-op when that content is already stored
    return Snapshot(digest, entries, manifest, ignore_file, updates)


def manifest_files(manifest: dict) -> dict[str, str]:
    """path -> digest of a stored manifest."""
    return {row[0]: row[1] for row in manifest.get("files", [])}


def materialize(manifest: dict, objects: ObjectStore, dest: str | os.PathLike[str]) -> None:
    """Write the snapshot's files into ``dest`` (a fresh, writable copy the step may change)."""
    root = os.fspath(dest)
    os.makedirs(root, exist_ok=True)
    made = {root}
    for rel in manifest.get("folders", []):
        os.makedirs(os.path.join(root, *rel.split("/")), exist_ok=True)
    for rel, digest, _size, executable in manifest.get("files", []):
        target = os.path.join(root, *rel.split("/"))
        parent = os.path.dirname(target)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        shutil.copyfile(objects.path_for(digest), target)
        os.chmod(target, 0o755 if executable else 0o644)


def diff_manifests(old: dict, new: dict) -> list[str]:
    """Human lines naming what changed between two snapshots ("train.py modified")."""
    a, b = manifest_files(old), manifest_files(new)
    lines = [f"{p} modified" for p in sorted(a.keys() & b.keys()) if a[p] != b[p]]
    lines += [f"{p} added" for p in sorted(b.keys() - a.keys())]
    lines += [f"{p} removed" for p in sorted(a.keys() - b.keys())]
    before, after = set(old.get("folders", [])), set(new.get("folders", []))
    lines += [f"empty folder {p}/ added" for p in sorted(after - before)]
    lines += [f"empty folder {p}/ removed" for p in sorted(before - after)]
    return lines


def load_manifest(objects: ObjectStore, manifest_digest: str) -> dict:
    return json.loads(objects.read_bytes(manifest_digest))

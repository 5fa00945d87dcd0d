"""Dataset definitions: which files of which datastore (or URL), and how to read them.

A definition is plain JSON (kind, paths, reading options, transformations), so it can live in a
graph spec and in the registry. Resolving it lists the files through fsspec and yields a content
digest from the listing (size, ETag/checksum where the store gives one, path) without reading data.
"""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cairn.core.digests import digest_json
from cairn.core.errors import CairnError
from cairn.storage.datastores import DatastoreLocation, remote_path, translate_errors

TABULAR_FORMATS = ("delimited", "parquet", "json_lines")


class DatasetError(CairnError):
    """A dataset cannot be resolved or read."""


@dataclass(frozen=True)
class ResolvedFile:
    """One file of a dataset: where it is, and its path relative to the dataset's root."""

    datastore: str | None  # None for http(s) URLs
    path: str  # full path in the store's filesystem (or the URL)
    relative: str
    size: int
    version: str  # ETag / checksum / mtime: what changes when the bytes change


def _has_magic(path: str) -> bool:
    return globlib.has_magic(path)


def _static_prefix(pattern: str) -> str:
    parts = []
    for part in pattern.split("/"):
        if _has_magic(part):
            break
        parts.append(part)
    return "/".join(parts)


def _version_of(info: dict[str, Any]) -> str:
    """What changes when the bytes change: ETag/checksum, else the modification time (any spelling:
    S3 'ETag'/'LastModified', Azure 'etag'/'last_modified', http 'ETag'/'Last-Modified', local 'mtime')."""
    normalised = {k.lower().replace("-", "").replace("_", ""): v for k, v in info.items()}
    found = []
    for key in ("etag", "contentmd5", "md5", "checksum", "lastmodified", "mtime", "created"):
        value = normalised.get(key)
        if value:
            found.append(str(value.hex() if isinstance(value, (bytes, bytearray)) else value))
    return "|".join(found)


def listing_signature(loc: DatastoreLocation, relative: str) -> str | None:
    """What an object store says of the files under ``relative`` now (their paths, sizes and
    ETags/checksums), as one digest; None when nothing is there. A committed output on an object
    store records it: one overwritten or edited since (by another run, or by hand) is not reused."""
    fs, root = loc.filesystem()
    base = remote_path(root, relative).rstrip("/")
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(base)  # a listing cached by this process would hide a change made elsewhere
    try:
        infos = fs.find(base, detail=True) if fs.exists(base) else {}
    except Exception as exc:
        raise translate_errors(loc, f"listing {relative!r}", exc) from None
    files = [[full[len(base):], int(info.get("size") or 0), _version_of(info)]
             for full, info in infos.items() if info.get("type") != "directory"]
    return digest_json(sorted(files)) if files else None


def resolve_files(definition: dict[str, Any], locate: Any) -> list[ResolvedFile]:
    """Every file the definition names. ``locate(name)`` gives a DatastoreLocation."""
    found: dict[str, ResolvedFile] = {}
    systems: dict[str, tuple[Any, str]] = {}
    for entry in definition["paths"]:
        if "url" in entry:
            found[entry["url"]] = _resolve_url(entry["url"])
            continue
        if "local_copy" in entry:  # (cairn debug's copies of a dataset's files, where it had each)
            for f in _resolve_local_copy(entry["local_copy"]):
                found[f"local:{f.path}"] = f
            continue
        loc: DatastoreLocation = locate(entry["datastore"])
        if loc.name not in systems:  # one client per datastore: an S3 client costs ~0.2 s to set up
            systems[loc.name] = loc.filesystem()
        fs, root = systems[loc.name]
        pattern = remote_path(root, entry["path"] or ".")
        try:
            if _has_magic(entry["path"]):
                infos = fs.glob(pattern, detail=True)
                base = remote_path(root, _static_prefix(entry["path"]))
            elif fs.isdir(pattern):
                infos = fs.find(pattern, detail=True)
                base = pattern
            elif fs.exists(pattern):
                infos = {pattern: fs.info(pattern)}
                base = pattern.rsplit("/", 1)[0]
            else:
                infos = {}
                base = pattern
        except Exception as exc:
            raise translate_errors(loc, f"listing {entry['path']!r}", exc) from None
        for full, info in sorted(infos.items()):
            if info.get("type") == "directory":
                continue
            rel = full[len(base.rstrip("/")) + 1:] if full.startswith(base.rstrip("/") + "/") else full.rsplit("/", 1)[-1]
            _check_relative(rel, loc.name, full)
            found[f"{loc.name}:{full}"] = ResolvedFile(loc.name, full, rel, int(info.get("size") or 0), _version_of(info))
    files = list(found.values())
    if len({f.relative for f in files}) < len(files):
        # several paths hold files of the same name: keep them apart by their path in the store
        roots = {e["datastore"]: locate(e["datastore"]).filesystem()[1] for e in definition["paths"] if "datastore" in e}
        many_stores = len(roots) > 1
        files = [ResolvedFile(f.datastore, f.path,
                              (f"{f.datastore}/" if many_stores and f.datastore else "") +
                              (f.path[len(roots[f.datastore].rstrip("/")) + 1:] if f.datastore else f.relative),
                              f.size, f.version) for f in files]
    return files


def _check_relative(rel: str, store: str, full: str) -> None:
    from cairn.storage.datastores import remote_path

    try:
        remote_path("", rel)
    except Exception:
        raise DatasetError(f"object {full!r} of datastore {store!r} has '..' or an absolute path in its name; "
                           f"it cannot be part of a dataset") from None


def _filesystem_of(f: ResolvedFile, systems: dict[str, Any]) -> tuple[Any, str]:
    """(filesystem, path) of a resolved file: its datastore's (in ``systems``), this machine's for a
    file of a local copy (an absolute path: fsspec's URLs would take "::" in it for a chain), else
    its URL's."""
    import fsspec

    if f.datastore is not None:
        return systems[f.datastore], f.path
    if f.path.startswith("/"):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), f.path
    return fsspec.core.url_to_fs(f.path)


def _resolve_local_copy(root: str) -> list[ResolvedFile]:
    """The files of a folder on this machine (or the file), each where it is below it: what
    ``cairn debug`` gives a recreated step in place of a direct-mode dataset's datastore files."""
    def unreadable(exc: OSError) -> None:
        raise DatasetError(f"the copy of the dataset's files in {root!r} cannot be read: {exc}") from None

    found = []
    try:
        if os.path.isfile(root):
            st = os.stat(root)
            return [ResolvedFile(None, root, os.path.basename(root), st.st_size, str(st.st_mtime_ns))]
        if not os.path.isdir(root):
            raise FileNotFoundError(2, "no such file or folder", root)
        for folder, _dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
            for name in files:
                full = os.path.join(folder, name)
                st = os.stat(full)
                found.append(ResolvedFile(None, full, os.path.relpath(full, root).replace(os.sep, "/"), st.st_size,
                                          str(st.st_mtime_ns)))
    except OSError as exc:
        unreadable(exc)
    return sorted(found, key=lambda f: f.relative)


def _resolve_url(url: str) -> ResolvedFile:
    import fsspec

    if url.endswith("/"):
        raise DatasetError(f"dataset URL {url!r} names a folder; a URL dataset must name files")
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        cause = exc.__cause__ or exc.__context__
        if cause is not None and "connect" in f"{type(cause).__name__} {cause}".lower():
            raise DatasetError(f"cannot reach dataset URL {url!r}: {cause}") from None
        raise DatasetError(f"dataset URL {url!r} does not exist (HTTP 404)") from None
    except Exception as exc:
        raise DatasetError(f"cannot reach dataset URL {url!r}: {type(exc).__name__}: {exc}") from None
    return ResolvedFile(None, url, url.rstrip("/").rsplit("/", 1)[-1], int(info.get("size") or 0), _version_of(info))


def content_digest(files: list[ResolvedFile]) -> str:
    """Digest of what the store says about the files (no data is read)."""
    return digest_json(sorted([f.datastore or "", f.path, f.size, f.version] for f in files))


def missing_paths(definition: dict[str, Any], locate: Any) -> list[str]:
    """The datastore paths of ``definition`` that name nothing now (a path that does not exist, a
    glob that matches nothing), as ``datastore:path``: ask when it resolved to no file (an empty
    folder that exists is a dataset with no files; a path that is gone is a mistake)."""
    missing = []
    for entry in definition["paths"]:
        if "datastore" not in entry:
            continue
        loc: DatastoreLocation = locate(entry["datastore"])
        fs, root = loc.filesystem()
        pattern = remote_path(root, entry["path"] or ".")
        try:
            gone = not fs.glob(pattern) if _has_magic(entry["path"]) else not fs.exists(pattern)
        except Exception as exc:
            raise translate_errors(loc, f"listing {entry['path']!r}", exc) from None
        if gone:
            missing.append(f"{entry['datastore']}:{entry['path']}")
    return missing


def describe_paths(definition: dict[str, Any]) -> str:
    return ", ".join(e.get("url") or e.get("local_copy") or f"{e['datastore']}:{e['path']}" for e in definition["paths"])


def fetch(files: list[ResolvedFile], locate: Any, dest: Path) -> None:
    """Copy the files into ``dest`` keeping their relative paths (atomic per file)."""
    from concurrent.futures import ThreadPoolExecutor

    from cairn.storage.datastores import get_atomic
    from cairn.storage.paths import confined

    systems: dict[str, Any] = {}
    for f in files:
        if f.datastore is not None and f.datastore not in systems:
            systems[f.datastore] = locate(f.datastore).filesystem()[0]

    def one(f: ResolvedFile) -> None:
        target = confined(dest, f.relative, f"file {f.relative!r} of the dataset")
        get_atomic(*_filesystem_of(f, systems), target)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, files))


def local_folder(definition: dict[str, Any], locate: Any) -> str | None:
    """The dataset's own local folder or file when it is exactly one, on a local datastore (then
    consuming it needs no copy); else None."""
    paths = definition["paths"]
    if len(paths) == 1 and "local_copy" in paths[0]:
        return paths[0]["local_copy"] if os.path.exists(paths[0]["local_copy"]) else None
    if len(paths) != 1 or "datastore" not in paths[0] or _has_magic(paths[0]["path"]):
        return None
    loc = locate(paths[0]["datastore"])
    if loc.kind != "local":
        return None
    full = Path(remote_path(loc.config["path"], paths[0]["path"] or "."))
    return str(full) if full.exists() else None


# -- reading tabular data ------------------------------------------------------------------

def read_table(definition: dict[str, Any], files: list[ResolvedFile], locate: Any) -> Any:
    """A pandas DataFrame of every file (pyarrow reads them), then the transformations."""
    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError:
        raise DatasetError("reading tabular datasets needs pandas and pyarrow: pip install 'cairn[data]'") from None

    fmt = definition["format"]
    opts = definition.get("options", {})
    frames = []
    systems: dict[str, Any] = {}
    for f in sorted(files, key=lambda x: x.relative):
        if f.datastore is not None and f.datastore not in systems:
            systems[f.datastore] = locate(f.datastore).filesystem()[0]
        fs, path = _filesystem_of(f, systems)
        with fs.open(path, "rb") as handle:
            frame = _read_one(fmt, opts, handle, f)
        if opts.get("include_path"):
            frame.insert(0, "Path", f.relative)
        frames.append(frame)
    if not frames:
        raise DatasetError(f"the dataset ({describe_paths(definition)}) has no files")
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    types = opts.get("set_column_types") or {}
    for column, kind in types.items():
        if column not in table.columns:
            raise DatasetError(f"set_column_types names column {column!r}, which the data does not have "
                               f"(columns: {', '.join(map(str, table.columns))})")
        table[column] = _convert(table[column], kind, column)
    for op, arg in definition.get("transforms", []):
        table = _apply(table, op, arg)
    return table.reset_index(drop=True)


def _read_one(fmt: str, opts: dict[str, Any], handle: Any, f: ResolvedFile) -> Any:
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(handle).to_pandas()
        if fmt == "json_lines":
            import pyarrow.json as pj

            return pj.read_json(handle).to_pandas()
        import pyarrow.csv as pc

        raw = handle.read()
        encoding = _ENCODINGS.get(opts.get("encoding", "utf8").replace("-", "").replace("_", "").lower(),
                                  opts.get("encoding", "utf8"))
        if encoding != "utf-8":
            try:
                raw = raw.decode(encoding).encode("utf-8")
            except (UnicodeDecodeError, LookupError) as exc:
                raise DatasetError(f"{f.relative}: cannot decode as {encoding!r}: {exc}") from None
        else:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw[: exc.start].count(b"\n") + 1
                raise DatasetError(f"{f.relative}, line {line}: not valid UTF-8 (byte {exc.start}); pass "
                                   f"encoding='latin1' (or the file's encoding)") from None
        read = pc.ReadOptions(autogenerate_column_names=not opts.get("header", True))
        bad_rows: list[Any] = []
        on_error = opts.get("on_error", "fail")

        def invalid_row(row: Any) -> str:
            bad_rows.append(row)
            return "skip" if on_error == "skip" else "error"

        parse = pc.ParseOptions(delimiter=opts.get("separator", ","),
                                newlines_in_values=opts.get("support_multi_line", False),
                                invalid_row_handler=invalid_row)
        convert = pc.ConvertOptions(column_types=None) if opts.get("infer_column_types", True) else \
            pc.ConvertOptions(strings_can_be_null=True)
        if not opts.get("infer_column_types", True):  # every column as text: learn the names first
            names = pc.read_csv(pa.BufferReader(raw), read_options=read, parse_options=pc.ParseOptions(
                delimiter=opts.get("separator", ","), invalid_row_handler=lambda row: "skip")).column_names
            convert = pc.ConvertOptions(column_types={c: pa.string() for c in names})
        try:
            return pc.read_csv(pa.BufferReader(raw), read_options=read, parse_options=parse,
                               convert_options=convert).to_pandas()
        except pa.ArrowInvalid:
            if not bad_rows:
                raise
            row = bad_rows[-1]
            line = row.number if row.number is not None else _line_of(raw, row.text)
            raise DatasetError(f"{f.relative}, line {line}: expected {row.expected_columns} columns, got "
                               f"{row.actual_columns}: {row.text!r}; fix the row, or pass on_error='skip' to "
                               f"leave such rows out") from None
    except DatasetError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise DatasetError(f"{f.relative}: cannot read as {fmt}: {exc}") from None


# Azure ML v1's encoding names, and Python's
_ENCODINGS = {"utf8": "utf-8", "utf8bom": "utf-8-sig", "iso88591": "latin-1", "latin1": "latin-1",
              "windows1252": "cp1252", "ascii": "ascii", "utf16": "utf-16", "utf32": "utf-32"}


def _line_of(raw: bytes, text: str) -> int | str:
    at = raw.find(text.encode("utf-8"))
    return raw[:at].count(b"\n") + 1 if at >= 0 else "?"


def _convert(series: Any, kind: str, column: str) -> Any:
    import pandas as pd

    try:
        if kind in ("int", "integer"):
            return pd.to_numeric(series, errors="raise").astype("Int64")
        if kind in ("float", "double"):
            return pd.to_numeric(series, errors="raise").astype(float)
        if kind in ("str", "string"):
            return series.astype(str)
        if kind in ("bool", "boolean"):
            return series.map(lambda v: str(v).strip().lower() in ("1", "true", "yes", "y", "t"))
        if kind in ("datetime", "date"):
            return pd.to_datetime(series, errors="raise")
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"column {column!r} cannot be converted to {kind}: {exc}") from None
    raise DatasetError(f"unknown column type {kind!r} for column {column!r}; use int, float, str, bool or datetime")


def _apply(table: Any, op: str, arg: Any) -> Any:
    if op == "take":
        return table.head(arg)
    if op == "skip":
        return table.iloc[arg:]
    if op in ("keep_columns", "drop_columns"):
        missing = [c for c in arg if c not in table.columns]
        if missing:
            raise DatasetError(f"{op}: no column(s) {', '.join(map(repr, missing))} (columns: "
                               f"{', '.join(map(str, table.columns))})")
        return table[arg] if op == "keep_columns" else table.drop(columns=arg)
    if op == "split":
        import numpy as np

        fraction, seed, first = arg
        mask = np.random.default_rng(seed).random(len(table)) < fraction
        return table[mask] if first else table[~mask]
    raise DatasetError(f"unknown transformation {op!r}")


def definition_digest(definition: dict[str, Any]) -> str:
    return digest_json(definition)


def version_record(definition: dict[str, Any], files: list[ResolvedFile]) -> dict[str, Any]:
    """What the registry stores about a dataset version, from its definition and listing."""
    from cairn.core import ids

    return {"dataset_id": ids.new_id("ds"), "kind": definition["kind"], "definition": definition,
            "definition_digest": definition_digest(definition), "content_digest": content_digest(files),
            "file_count": len(files), "size": sum(f.size for f in files)}

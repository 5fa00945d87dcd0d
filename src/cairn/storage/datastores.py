"""Datastores over fsspec: a local folder, an Azure Blob container (adlfs) or an S3 bucket (s3fs).

Each kind is a small function that builds the filesystem and its root; transfers (parallel, with
progress) and error translation are shared. adlfs and s3fs are imported only when used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cairn.core.errors import CairnError, PathNotFoundError, UserInputError

KINDS = ("local", "azure_blob", "s3")
TRANSFER_THREADS = 8


class DatastoreAccessError(CairnError):
    """A datastore could not be reached or refused the credentials."""


@dataclass
class DatastoreLocation:
    """Where a datastore's bytes are: its kind, public settings and (decrypted) secrets."""

    name: str
    kind: str
    config: dict[str, Any]
    secrets: dict[str, Any] = field(default_factory=dict, repr=False)

    def filesystem(self) -> tuple[Any, str]:
        """(fsspec filesystem, root path inside it)."""
        return _BUILDERS[self.kind](self)


def _local(loc: DatastoreLocation) -> tuple[Any, str]:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(auto_mkdir=True), str(Path(loc.config["path"]))


def _azure(loc: DatastoreLocation) -> tuple[Any, str]:
    from adlfs import AzureBlobFileSystem

    c, s = loc.config, loc.secrets
    endpoint = blob_endpoint(c)
    if endpoint:  # an explicit endpoint (Azurite, sovereign clouds): a connection string says it all
        parts = [f"DefaultEndpointsProtocol={c.get('protocol') or 'https'}", f"AccountName={c['account_name']}",
                 f"BlobEndpoint={endpoint}"]
        if s.get("account_key"):
            parts.insert(2, f"AccountKey={s['account_key']}")
        if s.get("sas_token"):
            parts.append(f"SharedAccessSignature={s['sas_token'].lstrip('?')}")
        fs = AzureBlobFileSystem(connection_string=";".join(parts), skip_instance_cache=True)
    else:
        fs = AzureBlobFileSystem(account_name=c["account_name"], account_key=s.get("account_key"),
                                 sas_token=s.get("sas_token"), skip_instance_cache=True)
    return fs, c["container_name"]


def blob_endpoint(config: dict[str, Any]) -> str | None:
    """The blob service URL. ``endpoint`` is, as in Azure ML, a storage suffix such as
    'core.chinacloudapi.cn' (then https://<account>.blob.<suffix>), or a full URL (Azurite)."""
    endpoint = config.get("endpoint")
    if not endpoint or endpoint == "core.windows.net":
        return None
    if "://" in endpoint:
        return endpoint
    return f"{config.get('protocol') or 'https'}://{config['account_name']}.blob.{endpoint}"


def _s3(loc: DatastoreLocation) -> tuple[Any, str]:
    from s3fs import S3FileSystem

    c, s = loc.config, loc.secrets
    client_kwargs = {k: v for k, v in (("endpoint_url", c.get("endpoint_url")),
                                        ("region_name", c.get("region"))) if v}
    # Fail fast on an unreachable endpoint: botocore and s3fs would otherwise retry for ~40 s.
    fs = S3FileSystem(key=s.get("access_key_id"), secret=s.get("secret_access_key"),
                      anon=not s.get("access_key_id"), client_kwargs=client_kwargs, skip_instance_cache=True,
                      config_kwargs={"connect_timeout": 5, "retries": {"max_attempts": 2, "mode": "standard"}})
    fs.retries = 2
    return fs, c["bucket_name"]


_BUILDERS: dict[str, Callable[[DatastoreLocation], tuple[Any, str]]] = {
    "local": _local, "azure_blob": _azure, "s3": _s3,
}


def remote_path(root: str, relative: str | None) -> str:
    """``root/relative`` for a store, refusing absolute paths and ``..``."""
    if not relative:
        return root
    rel = PurePosixPath(str(relative).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise UserInputError(f"datastore path {relative!r} must be relative and stay inside the datastore "
                             f"(no leading '/', no '..')")
    return f"{root.rstrip('/')}/{rel.as_posix()}" if str(rel) != "." else root


def translate_errors(loc: DatastoreLocation, action: str, exc: BaseException) -> BaseException:
    """A clear error for the usual ways a store fails: missing, refused, unreachable."""
    text = f"{type(exc).__name__}: {exc}"
    where = _describe(loc)
    lowered = text.lower()
    if isinstance(exc, FileNotFoundError) or "notfound" in lowered or "nosuchbucket" in lowered \
            or "containernotfound" in lowered or "does not exist" in lowered:
        return PathNotFoundError(f"{action}: not found in datastore {loc.name!r} ({where}): {exc}")
    if "invalidresourcename" in lowered or "invalidbucketname" in lowered:
        return UserInputError(f"{action}: {where} is not a valid name for datastore {loc.name!r} (Azure container "
                              f"names: 3-63 lower-case letters, digits and '-'; S3 buckets: 3-63 lower-case "
                              f"letters, digits, '-' and '.')")
    if isinstance(exc, PermissionError) or "authenticat" in lowered or "403" in lowered \
            or "accessdenied" in lowered or "signature" in lowered or "invalidaccesskeyid" in lowered \
            or "incorrect padding" in lowered or "signingerror" in lowered:
        return DatastoreAccessError(f"{action}: datastore {loc.name!r} ({where}) refused the credentials; "
                                    f"check the key or token you registered it with ({type(exc).__name__})")
    if any(w in lowered for w in ("connect", "timeout", "unreachable", "name or service", "refused")):
        return DatastoreAccessError(f"{action}: cannot reach datastore {loc.name!r} at {where}; is the "
                                    f"endpoint right and the service up? ({type(exc).__name__})")
    return DatastoreAccessError(f"{action}: datastore {loc.name!r} ({where}) failed: {text}")


def _describe(loc: DatastoreLocation) -> str:
    c = loc.config
    if loc.kind == "azure_blob":
        return f"container {c['container_name']!r} of account {c['account_name']!r}" + \
            (f" at {c['endpoint']}" if c.get("endpoint") else "")
    if loc.kind == "s3":
        return f"bucket {c['bucket_name']!r}" + (f" at {c['endpoint_url']}" if c.get("endpoint_url") else "")
    return f"folder {c['path']}"


def probe(loc: DatastoreLocation, action: str, timeout: float = 5.0) -> None:
    """One TCP connection to the store's endpoint: an unreachable store fails in seconds, not after
    the SDKs' minutes of retries."""
    import socket
    from urllib.parse import urlparse

    c = loc.config
    if loc.kind == "azure_blob":
        url = blob_endpoint(c) or f"https://{c['account_name']}.blob.core.windows.net"
    elif loc.kind == "s3":
        url = c.get("endpoint_url") or f"https://s3.{c.get('region') or 'us-east-1'}.amazonaws.com"
    else:
        return
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        raise DatastoreAccessError(f"{action}: cannot reach datastore {loc.name!r} at {_describe(loc)} "
                                   f"({parsed.hostname}:{port}: {exc.strerror or exc}); is the endpoint right "
                                   f"and the service up?") from None


def validate(loc: DatastoreLocation, create_if_not_exists: bool = False) -> None:
    """Check that the store answers with these credentials (and make the container if asked)."""
    probe(loc, "registering")
    fs, root = loc.filesystem()
    try:
        if loc.kind == "local":
            if not Path(root).is_dir():
                raise FileNotFoundError(root)
            return
        if create_if_not_exists and not fs.exists(root):
            fs.mkdir(root)
        fs.ls(root, detail=False)
    except Exception as exc:
        raise translate_errors(loc, "registering", exc) from None


@dataclass
class TransferReport:
    files: int = 0
    bytes: int = 0
    skipped: int = 0


def _progress(total_bytes: int, description: str, show: bool) -> Any:
    if not show:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), transient=False)
    progress.start()
    progress.add_task(description, total=total_bytes)
    return progress


def upload(loc: DatastoreLocation, files: list[tuple[str, str]], overwrite: bool, show_progress: bool) -> TransferReport:
    """Upload (local path, datastore-relative path) pairs in parallel."""
    probe(loc, "uploading")
    fs, root = loc.filesystem()
    report = TransferReport()
    existing: set[str] = set()
    sources: dict[str, str] = {}
    for local, rel in files:
        if not os.path.isfile(local):
            raise PathNotFoundError(f"cannot upload {local!r}: no such file")
        if sources.setdefault(rel, local) != local:  # one would silently replace the other
            raise UserInputError(f"{sources[rel]!r} and {local!r} would both be uploaded to {rel!r}; pass "
                                 f"relative_root (their common folder) to keep the folders they are in")
    targets = [(local, remote_path(root, rel)) for local, rel in files]
    if not overwrite and targets:
        try:  # one listing of the common prefix, not one request per file
            common = os.path.commonpath([t for _, t in targets]) if len(targets) > 1 else targets[0][1]
            listed = set(fs.find(common)) if fs.exists(common) else set()
            existing = {t for _, t in targets if t in listed or t.rstrip("/") in listed}
        except Exception as exc:
            raise translate_errors(loc, "uploading", exc) from None
        report.skipped = len(existing)
        targets = [(a, b) for a, b in targets if b not in existing]

    def one(pair: tuple[str, str]) -> int:
        fs.put_file(pair[0], pair[1])
        return os.path.getsize(pair[0])

    _transfer(loc, "uploading", targets, one, sum(os.path.getsize(a) for a, _ in targets), show_progress, report)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    return report


def download(loc: DatastoreLocation, target_path: str, prefix: str | None, overwrite: bool,
             show_progress: bool) -> TransferReport:
    """Download every file under ``prefix`` into ``target_path``, keeping relative paths."""
    probe(loc, "downloading")
    fs, root = loc.filesystem()
    base = remote_path(root, prefix)
    try:
        listing = {base: fs.info(base)} if fs.isfile(base) else fs.find(base, detail=True)
        if not listing and prefix and "/" in base:  # a name prefix, as Azure ML's download has it
            parent = base.rsplit("/", 1)[0]
            listing = {k: v for k, v in fs.find(parent, detail=True).items() if k.startswith(base)}
        if not listing:
            raise FileNotFoundError(f"nothing under {prefix or '/'!r}")
    except FileNotFoundError as exc:
        raise translate_errors(loc, f"downloading {prefix or '/'!r}", exc) from None
    except Exception as exc:
        raise translate_errors(loc, "downloading", exc) from None
    dest_root = Path(target_path)
    plan = []
    report = TransferReport()
    prefix_len = len(root.rstrip("/")) + 1
    from cairn.storage.paths import confined

    for remote, info in sorted(listing.items()):
        # the path inside the datastore, as Azure ML does; a key with '..' in it is refused
        dest = confined(dest_root, remote[prefix_len:], f"object {remote!r} of datastore {loc.name!r}")
        if dest.exists() and not overwrite:
            report.skipped += 1
            continue
        plan.append((remote, dest, int(info.get("size") or 0)))
    def one(item: tuple[str, Path, int]) -> int:
        get_atomic(fs, item[0], item[1])
        return item[2]

    _transfer(loc, "downloading", plan, one, sum(p[2] for p in plan), show_progress, report)
    return report


def get_atomic(fs: Any, remote: str, dest: Path) -> None:
    """Copy one file out of a store; a reader of ``dest`` never sees half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.cairn-partial")
    fs.get_file(remote, str(tmp))
    os.replace(tmp, dest)


def _transfer(loc: DatastoreLocation, action: str, items: list[Any], one: Callable[[Any], int], total: int,
              show_progress: bool, report: TransferReport) -> None:
    """Run ``one`` over ``items`` in parallel, with a progress bar of bytes."""
    progress = _progress(total, f"{action} {'to' if action == 'uploading' else 'from'} {loc.name}", show_progress)
    try:
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            for size in pool.map(one, items):
                report.files += 1
                report.bytes += size
                if progress is not None:
                    progress.advance(progress.task_ids[0], size)
    except Exception as exc:
        raise translate_errors(loc, action, exc) from None
    finally:
        if progress is not None:
            progress.stop()

"""Content digests. One algorithm everywhere (BLAKE2b, 256 bits), written as ``blake2b:<hex>``."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

PREFIX = "blake2b:"
_CHUNK = 1 << 20
_READ_BUFFER = 256 << 10


def _fs_tick_ns() -> int | None:
    """``$CAIRN_FS_TICK_SECONDS``: the tick of the filesystems' clocks, where it is known better than
    guessed (a network filesystem whose server's clock runs behind this machine's: its skew added)."""
    text = os.environ.get("CAIRN_FS_TICK_SECONDS")
    if not text:
        return None
    try:
        seconds = float(text)
        if not 0 <= seconds < 1e9:
            raise ValueError
    except ValueError:
        import warnings

        warnings.warn(f"CAIRN_FS_TICK_SECONDS={text!r} is not a number of seconds (such as 2 or 0.02): ignored, "
                      f"the tick is guessed from each file's mtime", UserWarning, stacklevel=2)
        return None
    return int(seconds * 1e9)


_FS_TICK_NS = _fs_tick_ns()


def changed_too_recently(st: os.stat_result, now_ns: int) -> bool:
    """Whether a file stated at ``now_ns`` (taken before the stat) could still be edited, at the same
    size, without its stat changing: within the same tick of its filesystem's clock as its last
    change (git's "racily clean" files). Its change time decides (the kernel sets it: ``touch -d``
    and tar cannot put it ahead). A whole-second mtime is taken for a clock of seconds (FAT: 2 s);
    otherwise the kernel's timestamps move with its tick (<= 10 ms; exFAT: 10 ms);
    ``$CAIRN_FS_TICK_SECONDS`` says it instead. Such a file is compared by content, not stat.
    (``runner/forkserver.py``, which imports nothing of Cairn's, has a copy.)"""
    if _FS_TICK_NS is not None:
        window = _FS_TICK_NS
    else:
        window = 2_000_000_000 if st.st_mtime_ns % 1_000_000_000 == 0 else 20_000_000
    return now_ns - st.st_ctime_ns < window


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=32)


def digest_bytes(data: bytes) -> str:
    h = _hasher()
    h.update(data)
    return PREFIX + h.hexdigest()


def canonical_json(value: Any) -> bytes:
    """The one serialisation that digests are taken of: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_json(value: Any) -> str:
    return digest_bytes(canonical_json(value))


def digest_file(path: str | os.PathLike[str]) -> str:
    h = _hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return PREFIX + h.hexdigest()


def short(digest: str, n: int = 12) -> str:
    """``blake2b:9f1c2a...`` shortened for display."""
    return digest[: len(PREFIX) + n] if digest.startswith(PREFIX) else digest[:n]


def content_digest_file(path: str | os.PathLike[str]) -> str:
    """Digest of a step output's file: XXH3-128 (~10x BLAKE2b here). Output digests detect
    change and key reuse among a workspace's own steps; they are not a security boundary (the
    object store keeps BLAKE2b). Read in place into one reused buffer the size of a CPU cache
    (~0.18 s for 1 GiB here, against ~0.32 s through fresh 8 MiB chunks). Not through ``mmap``,
    which would be ~2x faster still: a file cut short while mapped kills the reading process
    (SIGBUS), and for local compute that is the agent."""
    import xxhash  # a dependency of Cairn: digests must not depend on what happens to be installed

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size >= _OVERLAP_FROM:
            _hash_overlapped(f, h)
        else:
            buffer = bytearray(_READ_BUFFER)
            view = memoryview(buffer)
            while n := f.readinto(buffer):
                h.update(view[:n])
    return "xxh3-128:" + h.hexdigest()


_OVERLAP_FROM = 32 << 20  # below this a second thread costs more than it saves
_OVERLAP_CHUNK = 1 << 20  # larger chunks fall out of the CPU's cache between the read and the hash


def _hash_overlapped(f: Any, h: Any) -> None:
    """Hash a large file while a second thread reads its next chunks (both release the GIL): 1 GiB
    in ~0.11 s instead of ~0.16 s here. Same digest as reading in turn. Hashing the file's halves in
    two threads gains nothing more here: XXH3 is bound by memory bandwidth (~7 GB/s on one thread,
    the same on two)."""
    import queue
    import threading

    free: queue.SimpleQueue = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(3):
        free.put(bytearray(_OVERLAP_CHUNK))
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                buffer = free.get()
                n = f.readinto(buffer)
                full.put((buffer, n))
                if not n:
                    return
        except BaseException as exc:  # handed to the hashing thread, which raises it
            full.put((exc, 0))

    reader = threading.Thread(target=read, name="cairn-digest-read", daemon=True)
    reader.start()
    try:
        while True:
            buffer, n = full.get()
            if isinstance(buffer, BaseException):
                raise buffer
            if not n:
                return
            h.update(memoryview(buffer)[:n])
            free.put(buffer)
    finally:
        stop.set()
        free.put(bytearray(0))  # a reader waiting for a buffer wakes, sees stop, and ends
        reader.join()

"""This machine's input cache: one fetch per content, read-only entries, and a size limit that
removes the least recently used entries but never one that a running step holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cairn.runner import input_cache


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "inputs"
    monkeypatch.setenv("CAIRN_INPUT_CACHE", str(root))
    return root


def filler(content: bytes, calls: list[str]):
    def fill(folder: Path) -> None:
        calls.append(folder.name)
        (folder / "data.bin").write_bytes(content)
    return fill


def test_an_input_is_fetched_once_and_kept_read_only(cache: Path) -> None:
    calls: list[str] = []
    first = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    again = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    assert first is not None and first == again and len(calls) == 1
    assert (first / "data.bin").read_bytes() == b"abc"
    assert not os.access(first, os.W_OK) or os.geteuid() == 0  # root ignores the bits
    assert oct(first.stat().st_mode & 0o777) == "0o555"


def test_a_changed_entry_is_fetched_again(cache: Path) -> None:
    calls: list[str] = []
    folder = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    assert folder is not None
    os.chmod(folder, 0o755)
    (folder / "extra.txt").write_text("a step wrote here")  # possible as root
    folder = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    assert folder is not None and len(calls) == 2 and sorted(p.name for p in folder.iterdir()) == ["data.bin"]


def test_an_entry_rewritten_in_place_at_the_same_size_is_fetched_again(cache: Path) -> None:
    """A step running as root (or one that made the file writable) rewrote a cached file: its size
    alone does not tell, its modification time does; the next step gets the data the store has."""
    calls: list[str] = []
    folder = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    assert folder is not None
    target = folder / "data.bin"
    os.chmod(target, 0o644)
    target.write_bytes(b"xyz")
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000_000))
    folder = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    assert folder is not None and len(calls) == 2 and (folder / "data.bin").read_bytes() == b"abc"


def test_the_least_recently_used_entries_go_first_but_held_ones_stay(cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_INPUT_CACHE_MAX_GB", str(2500 / 1024 ** 3))  # room for two 1000-byte entries
    calls: list[str] = []
    held: list[int] = []
    a = input_cache.cached_input("xxh:a", {"data.bin": 1000}, filler(b"a" * 1000, calls), held)  # a running step
    b = input_cache.cached_input("xxh:b", {"data.bin": 1000}, filler(b"b" * 1000, calls), None)
    os.utime(a, (1, 1))  # a is the least recently used
    os.utime(b, (2, 2))
    c = input_cache.cached_input("xxh:c", {"data.bin": 1000}, filler(b"c" * 1000, calls), None)
    assert a is not None and c is not None and b is not None
    assert a.is_dir() and c.is_dir() and not b.exists()  # a is held: b went instead
    for fd in held:
        os.close(fd)  # the step ended
    input_cache.cached_input("xxh:d", {"data.bin": 1000}, filler(b"d" * 1000, calls), None)
    assert not a.exists() and c.is_dir()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["xxh-c", "xxh-d"]


def test_a_changed_entry_that_another_step_holds_is_left_alone(cache: Path) -> None:
    calls: list[str] = []
    held: list[int] = []
    folder = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), held)
    os.chmod(folder, 0o755)
    (folder / "extra.txt").write_text("a step wrote here")
    assert input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None) is None  # fetch privately
    assert (folder / "extra.txt").exists() and len(calls) == 1  # the holder's files were not pulled away
    for fd in held:
        os.close(fd)
    folder = input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", calls), None)
    assert folder is not None and len(calls) == 2 and not (folder / "extra.txt").exists()


@pytest.mark.parametrize("value", ["lots", "nan", "inf", "-1"])
def test_a_bad_limit_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CAIRN_INPUT_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match=f"CAIRN_INPUT_CACHE_MAX_GB='{value}' is not a number of gigabytes"):
        input_cache.cached_input("xxh:a", {"data.bin": 3}, filler(b"abc", []), None)

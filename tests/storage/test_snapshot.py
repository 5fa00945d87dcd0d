from __future__ import annotations

import os
from pathlib import Path

import pytest

from cairn.core.errors import SnapshotTooLargeError
from cairn.storage import snapshot as snap_mod
from cairn.storage.objects import ObjectStore
from cairn.storage.snapshot import diff_manifests, materialize, take_snapshot


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def _paths(snap) -> list[str]:
    return [e.path for e in snap.entries]


def test_ignore_files_take_precedence_in_order(tmp_path):
    src = _tree(tmp_path / "src", {"a.py": "a", "data/big.csv": "x", "notes.txt": "n", "keep.log": "k",
                                   ".git/HEAD": "ref", "__pycache__/a.pyc": "c"})
    objects = ObjectStore(tmp_path / "objects")
    (src / ".gitignore").write_text("*.log\n")
    assert _paths(take_snapshot(src, objects, {})) == [".gitignore", "a.py", "data/big.csv", "notes.txt"]
    (src / ".amlignore").write_text("data/\n")
    assert "data/big.csv" not in _paths(take_snapshot(src, objects, {}))
    assert "keep.log" in _paths(take_snapshot(src, objects, {}))  # .gitignore no longer applies
    (src / ".cairnignore").write_text("notes.txt\n")
    snap = take_snapshot(src, objects, {})
    assert snap.ignore_file == ".cairnignore"
    assert "notes.txt" not in _paths(snap) and "data/big.csv" in _paths(snap)


def test_identical_content_is_stored_once_and_digest_is_stable(tmp_path):
    src = _tree(tmp_path / "src", {"a.txt": "same", "b/c.txt": "same"})
    objects = ObjectStore(tmp_path / "objects")
    first = take_snapshot(src, objects, {})
    stored = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert len(stored) == 1
    assert take_snapshot(src, objects, {}).digest == first.digest
    (src / "a.txt").write_text("changed")
    assert take_snapshot(src, objects, {}).digest != first.digest


def test_unchanged_files_are_not_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(snap_mod, "changed_too_recently", lambda st, now: False)  # (however fast this runs)
    src = _tree(tmp_path / "src", {f"f{i}.txt": str(i) for i in range(20)})
    objects = ObjectStore(tmp_path / "objects")
    first = take_snapshot(src, objects, {})
    cache = dict(first.stat_updates)
    assert len(cache) == 20
    calls = []
    real = snap_mod.digest_file
    monkeypatch.setattr(snap_mod, "digest_file", lambda p: calls.append(p) or real(p))
    again = take_snapshot(src, objects, cache)
    assert calls == [] and again.digest == first.digest and again.stat_updates == {}
    target = src / "f3.txt"
    target.write_text("new content")
    os.utime(target, ns=(1, 1))
    third = take_snapshot(src, objects, cache)
    assert [Path(c).name for c in calls] == ["f3.txt"] and third.digest != first.digest


def test_a_file_changed_just_before_the_walk_is_not_cached(tmp_path, monkeypatch):
    """Where a filesystem's clock is coarse, an edit in the same tick at the same size keeps the
    stat: a file changed that recently before the walk is read again at the next snapshot."""
    src = _tree(tmp_path / "src", {"train.py": "A = 1\n", "old.py": "B = 1\n"})
    # (whatever the time the walk takes: train.py is taken for changed within the tick, old.py not)
    monkeypatch.setattr(snap_mod, "changed_too_recently", lambda st, now: st.st_ino == os.stat(src / "train.py").st_ino)
    objects = ObjectStore(tmp_path / "objects")
    first = take_snapshot(src, objects, {})
    assert set(map(Path, first.stat_updates)) == {src / "old.py"}  # train.py: just written
    as_hashed = os.stat(src / "train.py")
    (src / "train.py").write_text("A = 2\n")  # same size; a coarse clock gives it the same time
    os.utime(src / "train.py", ns=(as_hashed.st_atime_ns, as_hashed.st_mtime_ns))
    second = take_snapshot(src, objects, dict(first.stat_updates))
    assert second.digest != first.digest
    assert [e.digest for e in second.entries if e.path == "train.py"] != [e.digest for e in first.entries
                                                                          if e.path == "train.py"]


def test_an_ignore_file_in_a_subfolder_applies_below_it(tmp_path):
    src = _tree(tmp_path / "src", {"a.py": "a", "sub/tmp.bin": "t", "sub/keep.py": "k", "sub/deep/x.bin": "x",
                                   "other/tmp.bin": "o"})
    objects = ObjectStore(tmp_path / "objects")
    (src / "sub" / ".gitignore").write_text("*.bin\n")  # as git reads it: for sub/ and below only
    assert _paths(take_snapshot(src, objects, {})) == ["a.py", "other/tmp.bin", "sub/.gitignore", "sub/keep.py"]
    (src / ".cairnignore").write_text("other/\n")  # the source chose .cairnignore: git's rules below do not apply
    assert "sub/tmp.bin" in _paths(take_snapshot(src, objects, {}))
    (src / "sub" / ".cairnignore").write_text("keep.py\n")
    assert [p for p in _paths(take_snapshot(src, objects, {})) if p.startswith(("sub/", "other/"))] == [
        "sub/.cairnignore", "sub/.gitignore", "sub/deep/x.bin", "sub/tmp.bin"]


def test_a_nested_ignore_file_may_include_again_what_an_outer_one_ignores(tmp_path):
    src = _tree(tmp_path / "src", {"a.csv": "a", "data/labels.csv": "l", "data/other.csv": "o"})
    (src / ".gitignore").write_text("*.csv\n")
    (src / "data" / ".gitignore").write_text("!labels.csv\n")  # as git reads it: the inner rule decides
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "objects"), {})) == [
        ".gitignore", "data/.gitignore", "data/labels.csv"]


def test_limits_name_the_largest_files_and_the_ignore_file(tmp_path):
    src = _tree(tmp_path / "src", {"small.py": "x", "huge.bin": "y" * 5000, "mid.bin": "z" * 1000})
    with pytest.raises(SnapshotTooLargeError) as info:
        take_snapshot(src, ObjectStore(tmp_path / "o"), {}, max_bytes=2000)
    msg = str(info.value)
    assert "huge.bin" in msg and msg.index("huge.bin") < msg.index("mid.bin") and ".cairnignore" in msg
    with pytest.raises(SnapshotTooLargeError, match="3 files"):
        take_snapshot(src, ObjectStore(tmp_path / "o"), {}, max_files=2)


def test_missing_source_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        take_snapshot(tmp_path / "nope", ObjectStore(tmp_path / "o"), {})


def test_materialize_restores_files_and_exec_bits(tmp_path):
    src = _tree(tmp_path / "src", {"run.sh": "echo hi", "pkg/mod.py": "x = 1"})
    os.chmod(src / "run.sh", 0o755)
    objects = ObjectStore(tmp_path / "objects")
    snap = take_snapshot(src, objects, {})
    dest = tmp_path / "work"
    materialize(snap.manifest, objects, dest)
    assert (dest / "pkg/mod.py").read_text() == "x = 1"
    assert os.access(dest / "run.sh", os.X_OK)
    (dest / "pkg/mod.py").write_text("changed by the step")  # a copy: the object store is untouched
    materialize(snap.manifest, objects, tmp_path / "work2")
    assert (tmp_path / "work2/pkg/mod.py").read_text() == "x = 1"


def test_diff_manifests_names_files():
    old = {"files": [["a.py", "d1", 1, False], ["b.py", "d2", 1, False]]}
    new = {"files": [["a.py", "d9", 1, False], ["c.py", "d3", 1, False]]}
    assert diff_manifests(old, new) == ["a.py modified", "c.py added", "b.py removed"]


def test_symlinked_folders_are_followed_but_never_in_a_loop(tmp_path):
    shared = _tree(tmp_path / "shared", {"lib.py": "x = 1"})
    src = _tree(tmp_path / "src", {"main.py": "import lib", "lib/real/mod.py": "V = 1"})
    (src / "common").symlink_to(shared, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # must not recurse forever
    (src / "lib" / "real" / "up").symlink_to("..", target_is_directory=True)
    (src / "zz").mkdir()
    (src / "zz" / "alias").symlink_to("../lib/real", target_is_directory=True)  # the real path stays too
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "o"), {})) == [
        "common/lib.py", "lib/real/mod.py", "main.py", "zz/alias/mod.py"]


def test_a_subfolder_uses_its_own_ignore_file_whatever_the_source_has(tmp_path):
    src = _tree(tmp_path / "src", {"data/big.bin": "b", "data/keep.txt": "k", "models/w.pt": "w",
                                   "vendor/lib/build/out.o": "o", "vendor/lib/x.py": "x"})
    (src / "data" / ".cairnignore").write_text("*.bin\n")
    (src / "models" / ".amlignore").write_text("*.pt\n")
    (src / "vendor" / "lib" / ".gitignore").write_text("build/\n")
    expected = ["data/.cairnignore", "data/keep.txt", "models/.amlignore", "vendor/lib/.gitignore", "vendor/lib/x.py"]
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "o"), {})) == expected
    (src / ".amlignore").write_text("nothing-matches\n")  # .amlignore at the top: not git's rules below
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "o"), {})) == [
        ".amlignore", *expected[:-1], "vendor/lib/build/out.o", "vendor/lib/x.py"]


def test_empty_folders_are_part_of_a_snapshot(tmp_path):
    src = _tree(tmp_path / "src", {"train.py": "t"})
    objects = ObjectStore(tmp_path / "o")
    plain = take_snapshot(src, objects, {})
    assert "folders" not in plain.manifest  # the digest of a snapshot without empty folders is as before
    (src / "logs").mkdir()
    (src / "logs" / "x.log").write_text("ignored")
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / ".gitignore").write_text("*.log\n")
    with_ignored = take_snapshot(src, objects, {})
    assert "folders" not in with_ignored.manifest  # a folder whose files are all ignored is not empty
    (src / "checkpoints").mkdir()
    (src / "out" / "deep").mkdir(parents=True)
    snap = take_snapshot(src, objects, {})
    assert snap.manifest["folders"] == ["checkpoints", "out/deep"] and snap.digest != with_ignored.digest
    materialize(snap.manifest, objects, tmp_path / "work")
    assert (tmp_path / "work" / "checkpoints").is_dir() and (tmp_path / "work" / "out" / "deep").is_dir()
    assert "empty folder checkpoints/ added" in diff_manifests(with_ignored.manifest, snap.manifest)


def test_a_file_name_that_is_not_utf8_is_a_clear_error_unless_ignored(tmp_path):
    from cairn.core.errors import UserInputError

    src = _tree(tmp_path / "src", {"a.py": "a"})
    (Path(os.fsdecode(bytes(src) + b"/caf\xe9.txt"))).write_text("x")
    with pytest.raises(UserInputError, match=r"caf.*not valid UTF-8.*\.cairnignore"):
        take_snapshot(src, ObjectStore(tmp_path / "o"), {})
    (src / ".cairnignore").write_text("caf*.txt\n")
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "o"), {})) == [".cairnignore", "a.py"]
    folder = Path(os.fsdecode(bytes(src) + b"/d\xe9j\xe0"))
    folder.mkdir()
    (folder / "plain.txt").write_text("x")  # an ASCII name, below one that is not UTF-8
    with pytest.raises(UserInputError, match="not valid UTF-8"):
        take_snapshot(src, ObjectStore(tmp_path / "o"), {})


def test_links_that_lead_to_the_same_folders_many_ways_stop_at_the_limit(tmp_path):
    src = tmp_path / "src"
    (src / "f0").mkdir(parents=True)
    (src / "f0" / "x.txt").write_text("x")
    for n in range(1, 22):  # each level links twice to the one below: 2**21 paths to f0
        (src / f"f{n}").mkdir()
        (src / f"f{n}" / "a").symlink_to(src / f"f{n - 1}", target_is_directory=True)
        (src / f"f{n}" / "b").symlink_to(src / f"f{n - 1}", target_is_directory=True)
    with pytest.raises(SnapshotTooLargeError, match="more than .* symbolic link"):
        take_snapshot(src, ObjectStore(tmp_path / "o"), {}, max_files=1000)


def test_too_many_folders_is_a_limit_of_its_own_said_plainly(tmp_path):
    src = tmp_path / "src"
    for n in range(450):
        (src / "runs" / f"r{n}").mkdir(parents=True)
    with pytest.raises(SnapshotTooLargeError) as info:
        take_snapshot(src, ObjectStore(tmp_path / "o"), {}, max_files=100)
    message = str(info.value)
    assert "more than 400 folders" in message and "symbolic link" not in message and "no files" in message


def test_a_source_folder_whose_name_is_not_utf8_is_a_clear_error(tmp_path):
    from cairn.core.errors import UserInputError

    src = Path(os.fsdecode(bytes(tmp_path) + b"/proj\xe9"))
    _tree(src, {"a.py": "a"})
    with pytest.raises(UserInputError, match="source folder .* not valid UTF-8"):
        take_snapshot(src, ObjectStore(tmp_path / "o"), {})


def test_excluded_folders_are_left_out(tmp_path):
    src = _tree(tmp_path / "src", {"train.py": "t", "data/runs/r1/o.txt": "o"})
    snap = take_snapshot(src, ObjectStore(tmp_path / "o"), {}, exclude=frozenset({os.path.realpath(src / "data")}))
    assert _paths(snap) == ["train.py"]


def test_a_folder_only_rule_never_decides_about_the_files_inside(tmp_path):
    src = _tree(tmp_path / "src", {"sub/models/big.ckpt": "b", "sub/models/keep.py": "k"})
    (src / ".gitignore").write_text("*.ckpt\n")
    (src / "sub" / ".gitignore").write_text("!models/\n")  # git: the folder, not big.ckpt, is re-included
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "objects"), {})) == [
        ".gitignore", "sub/.gitignore", "sub/models/keep.py"]


def test_a_rule_that_names_a_folder_decides_about_the_folder_not_its_files(tmp_path):
    """As git: `!data` re-includes the folder data, not data/x.txt that `*.txt` ignores; `logs/*`
    ignores what is in logs, but not the files of logs/keep once `!logs/keep/` re-included it."""
    src = _tree(tmp_path / "src", {"sub/data/x.txt": "x", "sub/data/y.csv": "y", "logs/a.log": "a",
                                   "logs/keep/b.log": "b"})
    (src / ".gitignore").write_text("*.txt\nlogs/*\n!logs/keep/\n")
    (src / "sub" / ".gitignore").write_text("!data\n")
    assert _paths(take_snapshot(src, ObjectStore(tmp_path / "o"), {})) == [
        ".gitignore", "logs/keep/b.log", "sub/.gitignore", "sub/data/y.csv"]

"""Output digests and stat signatures: empty folders count, and outputs recorded before they did
are still themselves."""

from __future__ import annotations

import os
from pathlib import Path

from cairn.storage.tree import (
    digest_tree,
    stat_signature,
    stat_signature_matches,
    stat_signatures,
    stat_summary,
    walk_tree,
)


def test_an_empty_folder_changes_the_digest_and_the_old_signature_still_matches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("v")
    before, signed_before = digest_tree(out).digest, stat_signature(out)
    (out / "checkpoints").mkdir()
    assert digest_tree(out).digest != before
    assert stat_signature(out) != signed_before and signed_before not in stat_signatures(out)
    (out / "checkpoints").rmdir()
    assert digest_tree(out).digest == before and stat_signature(out) == signed_before


def test_a_folder_added_to_an_output_recorded_now_is_noticed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("v")
    recorded = digest_tree(out).stat_signature  # what a commit records
    assert recorded in stat_signatures(out) and stat_signature_matches(out, recorded)
    (out / "new").mkdir()  # someone adds an empty folder to a committed output
    assert recorded not in stat_signatures(out) and not stat_signature_matches(out, recorded)


def test_an_output_recorded_before_empty_folders_counted_is_still_itself(tmp_path: Path) -> None:
    from cairn.core.digests import digest_json

    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("v")
    (out / "empty").mkdir()
    st = (out / "v.txt").stat()
    legacy = digest_json({"stat": [["v.txt", st.st_size, st.st_mtime_ns]]})  # what older commits recorded
    assert legacy in stat_signatures(out) and stat_signature_matches(out, legacy)
    (out / "v.txt").write_text("vv")  # its bytes changed in place: neither form matches
    assert not stat_signature_matches(out, legacy)


def test_an_output_walked_from_any_spelling_of_its_folder_lists_the_same_paths(tmp_path: Path, monkeypatch) -> None:
    from cairn.storage.tree import _walk

    out = tmp_path / "out"
    (out / "a" / "b").mkdir(parents=True)
    (out / "a" / "b" / "f.txt").write_text("f")
    (out / "top.txt").write_text("t")
    (out / "empty").mkdir()
    expected = ([("a/b/f.txt", "a/b/f.txt"), ("top.txt", "top.txt")], ["empty"])
    monkeypatch.chdir(tmp_path)
    for spelling in (str(out), f"{out}/", f"{out}//", "out", "out/", "./out", Path("out")):
        files, empty = _walk(Path(spelling) if isinstance(spelling, Path) else spelling)
        assert ([(rel, os.path.relpath(full, out)) for rel, full in files], empty) == expected, spelling
    monkeypatch.chdir(out)
    assert _walk(".")[0] == [("a/b/f.txt", "./a/b/f.txt"), ("top.txt", "./top.txt")]


def test_a_tree_walked_once_is_sized_signed_and_digested_as_digest_tree_does_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "empty").mkdir()
    (out / "a.bin").write_bytes(b"a" * 1000)
    (out / "sub" / "b.txt").write_text("bee")
    os.symlink("a.bin", out / "link")  # a link counts no bytes
    walked = walk_tree(out)
    alone = digest_tree(out)
    assert digest_tree(out, walked) == alone
    assert alone.size == 1003  # a link counts no bytes
    assert stat_summary(walked) == (alone.stat_signature, alone.size, alone.file_count)
    (out / "sub" / "b.txt").write_text("bees")  # one byte more, and a new modification time
    assert stat_summary(walk_tree(out))[0] != alone.stat_signature

"""Output digests and stat signatures: empty folders count, and outputs recorded before they did
are still themselves."""

from __future__ import annotations

from pathlib import Path

from cairn.storage.tree import digest_tree, stat_signature, stat_signatures


def test_an_empty_folder_changes_the_digest_and_the_old_signature_still_matches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("v")
    before, signed_before = digest_tree(out).digest, stat_signature(out)
    (out / "checkpoints").mkdir()
    assert digest_tree(out).digest != before
    assert stat_signature(out) != signed_before
    assert signed_before in stat_signatures(out)  # recorded before empty folders counted: still this output
    (out / "checkpoints").rmdir()
    assert digest_tree(out).digest == before and stat_signatures(out) == (signed_before,)

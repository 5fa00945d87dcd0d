"""What the follower shows of a live log: lines as a terminal leaves them."""

from __future__ import annotations

from cairn.client.follow import _display_lines


def test_a_progress_bar_redrawn_with_carriage_returns_shows_its_latest_drawing() -> None:
    assert _display_lines("train:  10%\rtrain:  20%\rtrain:  30%\r") == ["train:  30%"]
    assert _display_lines("loading\rdone\nnext line\n") == ["done", "next line"]


def test_plain_lines_and_blank_lines_are_kept() -> None:
    assert _display_lines("a\n\nb\n") == ["a", "", "b"]
    assert _display_lines("") == []
    assert _display_lines("\r") == []

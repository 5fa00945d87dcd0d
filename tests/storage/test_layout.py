"""Where an attempt stages its outputs, and what earlier attempts (of this and older versions of
Cairn) may have left to clear."""

from __future__ import annotations

import os

from cairn.storage.layout import earlier_staging_dirs, staging_dir


def test_an_attempt_stages_beside_the_outputs_folder_under_the_outputs_name() -> None:
    staging = staging_dir("/ds", "runs/r/s", "model", 2)
    assert staging == os.path.join("/ds", "runs/r/s", ".a2", "model")


def test_a_later_attempt_clears_what_every_layout_of_an_earlier_one_left() -> None:
    staging = staging_dir("/ds", "runs/r/s", "model", 3)
    step = os.path.join("/ds", "runs/r/s")
    assert sorted(earlier_staging_dirs(staging, 3)) == sorted([
        os.path.join(step, "staging"),  # the first layout
        os.path.join(step, "outputs", ".model.a1.staging"), os.path.join(step, "outputs", ".model.a2.staging"),
        os.path.join(step, "outputs", ".a1"), os.path.join(step, "outputs", ".a2"),
        os.path.join(step, ".a1"), os.path.join(step, ".a2"),  # this one
    ])
    assert earlier_staging_dirs(staging_dir("/ds", "runs/r/s", "model", 1), 1) == []
    assert earlier_staging_dirs("/scratch/staging/a2/model", 2) == []  # a node's scratch folder: removed whole

"""Path confinement: every path a user supplies stays inside its root."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from cairn.core.errors import UserInputError


def confined(root: str | os.PathLike[str], relative: str, what: str = "path") -> Path:
    """``root/relative``, refusing absolute paths and anything that climbs out of ``root``."""
    rel = PurePosixPath(str(relative).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise UserInputError(
            f"{what} {relative!r} must be relative and stay inside its root "
            f"(no leading '/', no '..'); got a path that would escape {str(root)!r}")
    return Path(root).joinpath(*rel.parts)

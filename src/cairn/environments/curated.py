"""Cairn's curated environments: available by name in every workspace, pinned for reproducibility.

Their Python is the agent's own minor version (Cairn cannot assume another one is installed);
the packages are pinned so that every machine builds the same environment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# python-dateutil (pandas needs it) at the version Cairn's client uses through botocore: its newest
# release would make the build warn that the environment pins one of the client's packages otherwise
SKLEARN_PINS = ["numpy==2.4.6", "pandas==3.1.1", "pyarrow==26.0.1", "python-dateutil==2.9.0.post0",
                "scikit-learn==1.9.1", "scipy==1.17.1"]


def _managed(name: str, pip: list[str]) -> dict[str, Any]:
    conda = {"name": name, "channels": ["conda-forge"], "dependencies": (["pip", {"pip": pip}] if pip else [])}
    return {"name": name, "python": {"user_managed_dependencies": False, "interpreter_path": None,
                                     "conda_dependencies": conda},
            "docker": {"enabled": False, "base_image": None}, "environment_variables": {}}


CURATED: dict[str, Callable[[], dict[str, Any]]] = {
    "cairn-minimal": lambda: _managed("cairn-minimal", []),
    "cairn-sklearn": lambda: _managed("cairn-sklearn", list(SKLEARN_PINS)),
}


def curated_definition(name: str) -> dict[str, Any] | None:
    make = CURATED.get(name)
    return make() if make else None

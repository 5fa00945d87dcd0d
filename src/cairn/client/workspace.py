"""Workspace: the entry point. An embedded workspace is a ``.cairn/`` folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.core.errors import NotFoundError, UserInputError, WorkspaceNotFoundError
from cairn.storage.layout import DOT, WorkspaceLayout

if TYPE_CHECKING:
    from cairn.backend.base import Backend
    from cairn.client.compute import ComputeTarget
    from cairn.client.datastore import Datastore
    from cairn.client.experiment import Experiment
    from cairn.client.run import Run


def _note_enclosing_workspace(root: Path) -> None:
    """A workspace made inside another's folder is often a mistake (``Workspace.create(".")`` run from
    a project's subfolder): say where the other one is."""
    for folder in Path(root).resolve().parents:
        if (folder / DOT / "config.json").is_file():
            print(f"note: made a new workspace in {root}, inside the workspace in {folder}; if you meant that "
                  f"one, remove {Path(root) / DOT} and open it with Workspace({str(folder)!r})", file=sys.stderr)
            return


class Workspace:
    """An embedded workspace rooted at ``path`` (the folder holding ``.cairn/``).

    Use :meth:`create` to make one and :meth:`from_config` to find one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise UserInputError(f"Workspace path must be a folder path (str or Path), not {type(path).__name__}")
        layout = WorkspaceLayout(path)
        if not layout.config.is_file():
            raise WorkspaceNotFoundError(
                f"no Cairn workspace in {layout.root} (missing {DOT}/config.json); "
                f"create one with `cairn init` or Workspace.create({str(path)!r})")
        from cairn.backend.through_agent import workspace_backend

        # through the workspace's agent while it is up (no store opened in this process), else opened here
        self._backend: Backend = workspace_backend(str(layout.root))

    @classmethod
    def _over(cls, backend: Any) -> Workspace:
        """A workspace reached through ``backend`` (a step's relay on a Ray node of another machine)."""
        ws = cls.__new__(cls)
        ws._backend = backend
        return ws

    @classmethod
    def create(cls, path: str | os.PathLike[str] = ".", exist_ok: bool = True, **ignored: Any) -> Workspace:
        """Make an embedded workspace in ``path`` (or open it when it exists and ``exist_ok``)."""
        if not isinstance(path, (str, os.PathLike)):
            raise UserInputError(f"Workspace.create path must be a folder path, not {type(path).__name__}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserInputError(f"{os.fspath(path)!r} is a file, not a folder: give the folder to make the "
                                 f"workspace in (its .cairn/ goes there)")
        layout = WorkspaceLayout(path)
        if exist_ok and layout.config.is_file() and layout.db.is_file() and all(d.is_dir() for d in layout.folders):
            ws = cls(path)  # through its agent while it is up: no store opened here
            if ws._backend.list_datastores() and ws._backend.list_compute_targets():
                return ws  # complete: nothing to make
        from cairn.backend.local import LocalBackend

        new = not layout.config.is_file()
        LocalBackend.create(path, exist_ok=exist_ok)  # makes what is missing (a clone with only config.json)
        if new:
            _note_enclosing_workspace(layout.root)
        return cls(path)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **ignored: Any) -> Workspace:
        """Find ``.cairn/config.json`` in ``path`` (default: the current folder) or its parents;
        without ``path``, in a step whose folder is outside its workspace, the step's workspace."""
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise UserInputError(f"Workspace.from_config path must be a folder or config.json path, not "
                                 f"{type(path).__name__}")
        start = Path(path) if path is not None else Path.cwd()
        if start.name == "config.json" and start.parent.name == DOT:
            return cls(start.parent.parent)
        start = start.resolve()
        for folder in (start, *start.parents):
            if (folder / DOT / "config.json").is_file():
                return cls(folder)
        if path is None:  # a step (or one `cairn debug` recreated) whose folder is outside its workspace
            for variable in ("CAIRN_WORKSPACE", "CAIRN_DEBUG_WORKSPACE"):
                own = os.environ.get(variable)
                if own and (Path(own) / DOT / "config.json").is_file():
                    return cls(own)
        if not start.exists():
            raise WorkspaceNotFoundError(f"{start} does not exist: give the folder of a Cairn workspace (or one "
                                         f"inside it), or make one there with `cairn init`")
        raise WorkspaceNotFoundError(
            f"no Cairn workspace found in {start} or any folder above it; run `cairn init` in your "
            f"project folder (or call Workspace.create(path)) first")

    # -- identity --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def location(self) -> str:
        return self._backend.location

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r}, location={self.location!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workspace) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    # -- what it holds ---------------------------------------------------------------------

    def get_default_datastore(self) -> Datastore:
        from cairn.client.datastore import Datastore

        return Datastore.get_default(self)

    @property
    def datastores(self) -> dict[str, Datastore]:
        from cairn.client.datastore import Datastore

        return {d["name"]: Datastore._from_record(self, d) for d in self._backend.list_datastores()}

    @property
    def compute_targets(self) -> dict[str, ComputeTarget]:
        from cairn.client.compute import ComputeTarget

        return {c["name"]: ComputeTarget._from_record(self, c) for c in self._backend.list_compute_targets()}

    @property
    def environments(self) -> dict[str, Any]:
        """Registered environments (latest versions) and Cairn's curated ones, by name."""
        from cairn.client.environment import Environment

        return Environment.list(self)

    @property
    def experiments(self) -> dict[str, Experiment]:
        from cairn.client.experiment import Experiment

        return {n: Experiment(self, n) for n in self._backend.list_experiments()}

    def get_run(self, run_id: str) -> Run:
        from cairn.client.run import Run

        if not isinstance(run_id, str):
            raise UserInputError(f"run_id must be a str, not {type(run_id).__name__}")
        record = self._backend.get_run(run_id)
        if record is None:
            raise NotFoundError(f"no run with id {run_id!r} in workspace {self.location}; "
                                f"`cairn runs list` shows the runs")
        return Run._from_record(self, record)

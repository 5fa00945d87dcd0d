"""Where each thing of an embedded workspace lives on disk. Paths come from ids, never user strings."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

DOT = ".cairn"


class WorkspaceLayout:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.dot = self.root / DOT

    @property
    def config(self) -> Path:
        return self.dot / "config.json"

    def identity(self) -> list[int]:
        """The workspace folder itself, whatever path reaches it (a bind mount, a link) and wherever
        it was moved: (device, inode) of .cairn/. Raises OSError when there is none."""
        st = os.stat(self.dot)
        return [st.st_dev, st.st_ino]

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders every workspace has."""
        return (self.dot, self.objects, self.datastores, self.work)

    def read_config(self) -> dict:
        """``config.json``'s values ({} when there is none)."""
        import json

        return json.loads(self.config.read_text()) if self.config.is_file() else {}

    def workspace_name(self, config: dict) -> str:
        return str(config.get("name") or self.root.name)

    @property
    def db(self) -> Path:
        return self.dot / "cairn.db"

    @property
    def objects(self) -> Path:
        return self.dot / "objects"

    @property
    def datastores(self) -> Path:
        return self.dot / "datastores"

    @property
    def envs(self) -> Path:
        return self.dot / "envs"

    @property
    def kept_code(self) -> Path:
        """Step scripts compiled by spare interpreters, by content (runner/spare_job.py)."""
        return self.dot / "compiled"

    @property
    def work(self) -> Path:
        return self.dot / "work"

    @property
    def agent_lock(self) -> Path:
        return self.dot / "agent.lock"

    @property
    def agent_starting(self) -> Path:
        return self.dot / "agent.starting"

    @property
    def agent_log(self) -> Path:
        return self.dot / "agent.log"

    @property
    def agent_socket(self) -> Path:
        return self._socket("agent")

    @property
    def scripts_socket(self) -> Path:
        """Where the agent answers the ``Run.get_context()`` calls of the steps it runs here."""
        return self._socket("scripts")

    def _socket(self, name: str) -> Path:
        path = self.dot / f"{name}.sock"
        if len(str(path)) < 100:  # AF_UNIX paths are limited to 108 bytes
            return path
        key = hashlib.blake2b(str(self.root).encode(), digest_size=8).hexdigest()
        suffix = "" if name == "agent" else f"-{name}"  # the agent's name as earlier versions made it
        short = Path(tempfile.gettempdir()) / f"cairn-{os.getuid()}" / f"{key}{suffix}.sock"
        private_folder(short.parent)
        return short


def private_folder(path: Path) -> None:
    """Make ``path`` a folder only this user can use, or refuse one that another user could have
    prepared (a predictable name in a shared /tmp must not let them intercept the agent)."""
    import stat

    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private folder of this user (owner uid {st.st_uid}, mode "
                              f"{stat.S_IMODE(st.st_mode):o}); remove it so that Cairn can make its own")


def run_dir(pipeline_run_id: str, step_run_id: str | None = None) -> str:
    """The datastore-relative folder of a run: ``runs/<pipeline-run>/<step-run>``."""
    return f"runs/{pipeline_run_id}/{step_run_id}" if step_run_id else f"runs/{pipeline_run_id}"


def staging_dir(root: str | os.PathLike[str], run_folder: str, output: str, attempt: int) -> str:
    """Where an attempt of a step writes an output before it is committed:
    ``<run folder>/.a<attempt>/<name>``, so that the commit is one rename (of the output, or of the
    whole attempt folder to ``outputs``: no folder made or removed) within the run folder, and the
    folder the step is given is named as the output is."""
    return os.path.join(root, run_folder, f".a{attempt}", output)


def earlier_staging_dirs(staging: str, attempt: int) -> list[str]:
    """The attempt folders an interrupted earlier attempt may have left beside ``staging``'s."""
    attempt_folder = os.path.dirname(staging)
    if attempt == 1 or os.path.basename(attempt_folder) != f".a{attempt}":  # (a node's scratch folder: removed whole)
        return []
    run_folder = os.path.dirname(attempt_folder)
    outputs, name = os.path.join(run_folder, "outputs"), os.path.basename(staging)
    # where earlier versions of Cairn staged: <run folder>/staging, then outputs/.<name>.a<k>.staging,
    # then outputs/.a<k>/<name>
    legacy = [os.path.join(run_folder, "staging"),
              *(os.path.join(outputs, f".{name}.a{k}.staging") for k in range(1, attempt)),
              *(os.path.join(outputs, f".a{k}") for k in range(1, attempt))]
    return [*legacy, *(os.path.join(run_folder, f".a{k}") for k in range(1, attempt))]

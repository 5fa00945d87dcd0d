"""Workspace creation and discovery, and what a workspace holds: datastores, compute targets,
experiments and runs; with the errors for bad arguments and unknown names."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cairn import (
    CairnError,
    ComputeTarget,
    Datastore,
    Experiment,
    LocalCompute,
    NotFoundError,
    Pipeline,
    PipelineRun,
    PythonScriptStep,
    StepRun,
    UserInputError,
    Workspace,
    WorkspaceNotFoundError,
)
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout
from cairn.store.db import SCHEMA_REVISION
from tests.conftest import require_no_workspace_above


@pytest.fixture
def make_workspace() -> Iterator[Callable[[Path], Workspace]]:
    """Workspace.create for tests that need their own folder; every agent is stopped afterwards."""
    made: list[Workspace] = []

    def make(path: Path) -> Workspace:
        ws = Workspace.create(path)
        made.append(ws)
        return ws

    yield make
    for ws in made:
        stop_agent(WorkspaceLayout(ws.location))


def _no_workspace_above(path: Path) -> None:
    require_no_workspace_above(path)


# -- creating ---------------------------------------------------------------------------------


def test_create_makes_an_embedded_workspace(make_workspace: Callable[[Path], Workspace], tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "proj")
    dot = tmp_path / "proj" / ".cairn"
    assert (dot / "config.json").is_file() and (dot / "cairn.db").is_file()
    assert (dot / "objects").is_dir() and (dot / "datastores").is_dir()
    config = json.loads((dot / "config.json").read_text())
    assert config["kind"] == "embedded" and config["name"] == "proj"
    assert ws.name == "proj"
    assert ws.location == str((tmp_path / "proj").resolve())

    with sqlite3.connect(dot / "cairn.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(SCHEMA_REVISION,)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "datastores", "compute_targets", "experiments", "metrics"} <= tables

    assert set(ws.datastores) == {"workspaceblobstore"}
    assert set(ws.compute_targets) == {"local"}
    assert ws.compute_targets["local"].type == "local"
    assert ws.experiments == {}


def test_create_makes_missing_folders_and_is_idempotent(make_workspace: Callable[[Path], Workspace],
                                                        tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "a" / "b")
    again = make_workspace(tmp_path / "a" / "b")
    assert again == ws and hash(again) == hash(ws)
    assert set(again.datastores) == {"workspaceblobstore"}
    assert set(again.compute_targets) == {"local"}
    with pytest.raises(FileExistsError, match="already exists"):
        Workspace.create(tmp_path / "a" / "b", exist_ok=False)


@pytest.mark.parametrize("path", [3, None, ["ws"]])
def test_create_rejects_a_path_of_the_wrong_type(path: object) -> None:
    with pytest.raises(UserInputError) as info:
        Workspace.create(path)  # type: ignore[arg-type]
    assert "folder path" in str(info.value) and type(path).__name__ in str(info.value)


@pytest.mark.parametrize("path", [3, None])
def test_workspace_rejects_a_path_of_the_wrong_type(path: object) -> None:
    with pytest.raises(UserInputError) as info:
        Workspace(path)  # type: ignore[arg-type]
    assert "folder path" in str(info.value) and type(path).__name__ in str(info.value)


def test_workspace_of_a_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceNotFoundError) as info:
        Workspace(tmp_path)
    assert str(tmp_path.resolve()) in str(info.value)
    assert "cairn init" in str(info.value)
    assert not (tmp_path / ".cairn").exists()


def test_looking_for_a_workspace_in_a_folder_that_does_not_exist_says_so(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceNotFoundError) as info:
        Workspace.from_config(tmp_path / "typo")
    assert f"{tmp_path.resolve() / 'typo'} does not exist" in str(info.value)


# -- finding ----------------------------------------------------------------------------------


def test_from_config_finds_the_workspace_in_the_folder_or_a_parent(workspace: Workspace,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(workspace.location)
    deep = root / "src" / "nested"
    deep.mkdir(parents=True)
    assert Workspace.from_config(root) == workspace
    assert Workspace.from_config(str(deep)) == workspace
    assert Workspace.from_config(root / ".cairn" / "config.json") == workspace
    monkeypatch.chdir(deep)
    assert Workspace.from_config() == workspace


def test_from_config_without_a_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_workspace_above(tmp_path)
    for call in (lambda: Workspace.from_config(tmp_path), lambda: Workspace.from_config()):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(WorkspaceNotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CairnError)
        message = str(info.value)
        assert "`cairn init`" in message
        assert str(tmp_path.resolve()) in message


def test_from_config_rejects_a_path_of_the_wrong_type() -> None:
    with pytest.raises(UserInputError, match="path"):
        Workspace.from_config(5)  # type: ignore[arg-type]


# -- datastores -------------------------------------------------------------------------------


def test_default_datastore(workspace: Workspace) -> None:
    store = workspace.get_default_datastore()
    assert store.name == "workspaceblobstore"
    assert store.is_default and store.datastore_type == "local"
    assert Path(store.root).is_dir()
    assert store == Datastore(workspace) == Datastore(workspace, "workspaceblobstore")
    assert store == Datastore.get(workspace, "workspaceblobstore") == Datastore.get_default(workspace)
    assert workspace.datastores == {"workspaceblobstore": store}
    assert store.local_path("runs/x") == Path(store.root) / "runs" / "x"


def test_unknown_datastore_lists_the_registered_ones(workspace: Workspace, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        Datastore(workspace, "blobs")
    assert "'blobs'" in str(info.value) and "registered: 'workspaceblobstore'" in str(info.value)

    (tmp_path / "external").mkdir()
    ext = Datastore.register_local_folder(workspace, "external_data", tmp_path / "external")
    assert ext.name == "external_data" and not ext.is_default
    assert Path(ext.root) == (tmp_path / "external").resolve()
    assert set(workspace.datastores) == {"workspaceblobstore", "external_data"}
    with pytest.raises(NotFoundError) as info:
        Datastore(workspace, "blobs")
    assert "'external_data'" in str(info.value) and "'workspaceblobstore'" in str(info.value)


@pytest.mark.parametrize(("args", "error", "fragment"), [
    (("ws", None), UserInputError, "Datastore workspace must be of type Workspace"),
    ((None, "workspaceblobstore"), UserInputError, "Datastore workspace must be of type Workspace"),
    (("WS", 5), UserInputError, "datastore name must be of type str, not int"),
    (("WS", ["workspaceblobstore"]), UserInputError, "datastore name must be of type str, not list"),
])
def test_datastore_rejects_bad_arguments(workspace: Workspace, args: tuple[object, object], error: type,
                                         fragment: str) -> None:
    ws_arg, name = args
    with pytest.raises(error) as info:
        Datastore(workspace if ws_arg == "WS" else ws_arg, name)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_register_local_folder_rejects_bad_arguments(workspace: Workspace, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(UserInputError) as info:
        Datastore.register_local_folder(workspace, "my-data", folder)
    assert "'my-data'" in str(info.value) and "letters, digits and underscores" in str(info.value)
    with pytest.raises(FileNotFoundError) as info_missing:
        Datastore.register_local_folder(workspace, "missing", tmp_path / "absent")
    assert "absent" in str(info_missing.value)
    Datastore.register_local_folder(workspace, "my_data", folder)
    assert Datastore.register_local_folder(workspace, "my_data", folder).name == "my_data"  # the same: as it is
    default = workspace.get_default_datastore()  # registered with a path relative to .cairn/
    assert Datastore.register_local_folder(workspace, default.name, default.root).name == default.name
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UserInputError) as info:
        Datastore.register_local_folder(workspace, "my_data", other)
    assert "'my_data' is already registered" in str(info.value) and "overwrite=True" in str(info.value)
    assert Datastore.register_local_folder(workspace, "my_data", other, overwrite=True).name == "my_data"


@pytest.mark.parametrize("bad", ["workspace", "path"])
def test_register_local_folder_rejects_arguments_of_the_wrong_type(workspace: Workspace, tmp_path: Path,
                                                                   bad: str) -> None:
    args: list[object] = [workspace, "my_data", tmp_path]
    args[0 if bad == "workspace" else 2] = 5
    with pytest.raises(UserInputError, match=bad):
        Datastore.register_local_folder(*args)  # type: ignore[arg-type]


def test_datastore_local_path_refuses_escapes(workspace: Workspace) -> None:
    store = workspace.get_default_datastore()
    for escape in ("../outside", "/etc/passwd", "runs/../../x"):
        with pytest.raises(UserInputError) as info:
            store.local_path(escape)
        assert repr(escape) in str(info.value) and "'workspaceblobstore'" in str(info.value)


# -- compute targets --------------------------------------------------------------------------


def test_local_compute_target(workspace: Workspace) -> None:
    local = ComputeTarget(workspace, "local")
    assert (local.name, local.type) == ("local", "local")
    assert local.get_status()["state"] == "Ready"
    assert [t.name for t in ComputeTarget.list(workspace)] == ["local"]


def test_unknown_compute_target_lists_the_known_ones(workspace: Workspace) -> None:
    with pytest.raises(NotFoundError) as info:
        ComputeTarget(workspace, "gpu")
    assert "'gpu'" in str(info.value) and "known: 'local'" in str(info.value)
    assert "ComputeTarget.create" in str(info.value)


def test_create_a_compute_target(workspace: Workspace) -> None:
    cpu = ComputeTarget.create(workspace, "cpu", LocalCompute.provisioning_configuration(max_concurrency=2))
    assert set(workspace.compute_targets) == {"local", "cpu"}
    assert cpu.get_status()["max_concurrency"] == 2
    assert ComputeTarget(workspace, "cpu").config == {"max_concurrency": 2}


@pytest.mark.parametrize(("args", "fragment"), [
    (("ws", "local"), "ComputeTarget workspace must be of type Workspace"),
    (("WS", 5), "compute target name must be of type str, not int"),
    (("WS", None), "compute target name must be of type str, not NoneType"),
])
def test_compute_target_rejects_bad_arguments(workspace: Workspace, args: tuple[object, object],
                                              fragment: str) -> None:
    ws_arg, name = args
    with pytest.raises(UserInputError, match=fragment):
        ComputeTarget(workspace if ws_arg == "WS" else ws_arg, name)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "fragment"), [
    (0, "max_concurrency must be at least 1, not 0"),
    (-3, "max_concurrency must be at least 1, not -3"),
    ("2", "max_concurrency must be of type int, not str"),
    (1.5, "max_concurrency must be of type int, not float"),
    (True, "max_concurrency must be of type int, not bool"),
])
def test_provisioning_configuration_rejects_bad_concurrency(value: object, fragment: str) -> None:
    with pytest.raises(UserInputError) as info:
        LocalCompute.provisioning_configuration(max_concurrency=value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_create_compute_target_rejects_bad_arguments(workspace: Workspace) -> None:
    config = LocalCompute.provisioning_configuration()
    with pytest.raises(UserInputError) as info:
        ComputeTarget.create(workspace, "1-gpu", config)
    assert "'1-gpu'" in str(info.value) and "compute target name" in str(info.value)
    with pytest.raises(UserInputError) as info:
        ComputeTarget.create(workspace, "gpu", {"max_concurrency": 2})
    assert "LocalCompute.provisioning_configuration" in str(info.value) and "dict" in str(info.value)
    assert set(workspace.compute_targets) == {"local"}


def test_a_compute_target_may_be_named_as_in_azure_ml(workspace: Workspace, tmp_path) -> None:
    from cairn import Experiment, Pipeline, PythonScriptStep

    ComputeTarget.create(workspace, "cpu-cluster", LocalCompute.provisioning_configuration(max_concurrency=1))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hi.py").write_text("print('hi')\n")
    step = PythonScriptStep("hi.py", name="hi", source_directory=str(tmp_path / "src"), compute_target="cpu-cluster")
    assert Experiment(workspace, "e").submit(Pipeline(workspace, [step])).wait_for_completion(
        show_output=False) == "Completed"


def test_create_compute_target_rejects_a_workspace_that_is_not_one() -> None:
    with pytest.raises(UserInputError, match="workspace"):
        ComputeTarget.create("ws", "cpu", LocalCompute.provisioning_configuration())  # type: ignore[arg-type]


# -- experiments and runs ---------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["run_doesnotexist", "", "step_0000"])
def test_get_run_of_an_unknown_id(workspace: Workspace, run_id: str) -> None:
    with pytest.raises(NotFoundError) as info:
        workspace.get_run(run_id)
    assert repr(run_id) in str(info.value) and "cairn runs list" in str(info.value)


@pytest.mark.parametrize("run_id", [5, None, ["run_x"]])
def test_get_run_rejects_an_id_of_the_wrong_type(workspace: Workspace, run_id: object) -> None:
    with pytest.raises(UserInputError, match=f"run_id must be a str, not {type(run_id).__name__}"):
        workspace.get_run(run_id)  # type: ignore[arg-type]


def test_experiments_and_runs_after_a_run(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    src = write_script("hello.py", "print('hello')\n")
    experiment = Experiment(workspace, "greetings")
    assert workspace.experiments == {}
    run = experiment.submit(Pipeline(workspace, [PythonScriptStep("hello.py", name="hello", source_directory=src)]))
    run.wait_for_completion(show_output=False, timeout_seconds=60)

    assert workspace.experiments == {"greetings": experiment}
    assert Experiment.list(workspace) == [experiment]
    found = workspace.get_run(run.id)
    assert isinstance(found, PipelineRun) and found == run and found.status == "Completed"
    (step_run,) = run.get_steps()
    found_step = workspace.get_run(step_run.id)
    assert isinstance(found_step, StepRun) and found_step.name == "hello"
    assert found_step.parent == run
    assert "hello" in found_step.get_stdout_log()


def test_a_workspace_moved_while_its_agent_idles_is_served_where_it_is_now(tmp_path) -> None:
    """The old agent still answers on the moved socket, but for the old path: it is not used, and
    the next run's agent serves the new place."""
    from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
    from cairn.engine.client import stop_agent
    from cairn.storage.layout import WorkspaceLayout

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.py").write_text("print('hello')\n")
    before, after = tmp_path / "before", tmp_path / "after"
    ws = Workspace.create(str(before))
    try:
        step = PythonScriptStep("hello.py", name="hello", source_directory=str(src), allow_reuse=False)
        assert Experiment(ws, "e").submit(Pipeline(ws, [step])).wait_for_completion(show_output=False) == "Completed"
        before.rename(after)
        moved = Workspace.from_config(str(after))
        assert moved.location == str(after)
        step = PythonScriptStep("hello.py", name="hello", source_directory=str(src), allow_reuse=False)
        run = Experiment(moved, "e").submit(Pipeline(moved, [step]))
        assert run.wait_for_completion(show_output=False, timeout_seconds=60) == "Completed"
        assert run.get_steps()[0].get_stdout_log() == "hello\n"
    finally:
        stop_agent(WorkspaceLayout(str(after if after.exists() else before)))


def test_an_agent_of_a_workspace_re_created_at_its_path_leaves_the_new_ones_socket(tmp_path) -> None:
    import os
    import select
    import shutil
    import signal

    from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
    from cairn.engine.client import _request, stop_agent
    from cairn.storage.layout import WorkspaceLayout

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.py").write_text("print('hello')\n")
    place = tmp_path / "project"

    def run_once() -> str:
        ws = Workspace.create(str(place))
        step = PythonScriptStep("hello.py", name="hello", source_directory=str(src), allow_reuse=False)
        return Experiment(ws, "e").submit(Pipeline(ws, [step])).wait_for_completion(show_output=False,
                                                                                    timeout_seconds=60)
    try:
        assert run_once() == "Completed"
        old = _request(WorkspaceLayout(str(place)), {"op": "sync"})["pid"]
        shutil.rmtree(place)  # re-created from scratch while its agent idles
        assert run_once() == "Completed"
        ended = os.pidfd_open(old)
        os.kill(old, signal.SIGTERM)  # the old agent stops, as it would once idle
        assert select.select([ended], [], [], 30)[0], "the old agent did not stop"
        os.close(ended)
        assert (place / ".cairn" / "agent.sock").exists()  # the new agent's: still reachable
        assert run_once() == "Completed"
    finally:
        stop_agent(WorkspaceLayout(str(place)))


def test_a_workspace_made_inside_another_says_so(tmp_path, capsys):
    from cairn import Workspace

    Workspace.create(tmp_path / "project")
    capsys.readouterr()
    Workspace.create(tmp_path / "project" / "src")
    err = capsys.readouterr().err
    assert f"inside the workspace in {tmp_path / 'project'}" in err and f"Workspace({str(tmp_path / 'project')!r})" in err
    Workspace.create(tmp_path / "project" / "src")  # it exists now: nothing made, nothing said
    assert capsys.readouterr().err == ""
    Workspace.create(tmp_path / "elsewhere")
    assert capsys.readouterr().err == ""


def test_replacing_the_default_datastore_keeps_it_the_default(workspace: Workspace, tmp_path: Path) -> None:
    from cairn import Datastore

    (tmp_path / "elsewhere").mkdir()
    name = workspace.get_default_datastore().name
    Datastore.register_local_folder(workspace, name, tmp_path / "elsewhere", overwrite=True)
    default = workspace.get_default_datastore()
    assert default.name == name and Path(default.root) == (tmp_path / "elsewhere").resolve()


def test_uploads_that_would_replace_each_other_are_refused(workspace: Workspace, tmp_path: Path) -> None:
    from cairn import CairnError, UserInputError

    for rel in ("a.txt", "sub/a.txt"):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(rel)
    store = workspace.get_default_datastore()
    files = [tmp_path / "src" / "a.txt", tmp_path / "src" / "sub" / "a.txt"]
    with pytest.raises(UserInputError, match="would both be uploaded to 'flat/a.txt'"):
        store.upload_files(files, target_path="flat", show_progress=False)
    assert not (Path(store.root) / "flat").exists()
    store.upload_files(files, relative_root=str(tmp_path / "src"), target_path="kept", show_progress=False)
    assert (Path(store.root) / "kept" / "sub" / "a.txt").read_text() == "sub/a.txt"
    with pytest.raises(CairnError, match="not found"):  # a clear error of Cairn's (and a FileNotFoundError)
        store.download(tmp_path / "back", prefix="zzz", show_progress=False)

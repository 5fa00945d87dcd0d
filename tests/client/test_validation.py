"""Pipeline composition and validation: validate() lists every problem at once, each naming its step;
Experiment.submit of an invalid pipeline raises PipelineValidationError with all of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cairn import (
    CairnError,
    ComputeTarget,
    Experiment,
    LocalCompute,
    Pipeline,
    PipelineData,
    PipelineValidationError,
    PythonScriptStep,
    RunConfiguration,
    Workspace,
)


@pytest.fixture
def src(write_script: Callable[..., Path]) -> Path:
    """A source folder holding step.py."""
    return write_script("step.py", "print('step')\n")


def step(src: Path, name: str, **kwargs: object) -> PythonScriptStep:
    return PythonScriptStep("step.py", name=name, source_directory=src, **kwargs)  # type: ignore[arg-type]


def names(pipeline: Pipeline) -> set[str]:
    return {s.name for s in pipeline.steps}


def only_problem(pipeline: Pipeline) -> str:
    problems = pipeline.validate()
    assert len(problems) == 1, problems
    return problems[0]


# -- composition ------------------------------------------------------------------------------


def test_a_sound_pipeline_has_no_problems(workspace: Workspace, src: Path) -> None:
    prepped, model = PipelineData("prepped"), PipelineData("model", datastore=workspace.get_default_datastore())
    rc = RunConfiguration()
    rc.max_run_duration_seconds = 60
    prep = step(src, "prep", arguments=["--out", prepped], outputs=[prepped], runconfig=rc)
    train = step(src, "train", arguments=["--data", prepped.as_input(), "--out", model], outputs=[model],
                 compute_target=ComputeTarget(workspace, "local"), params={"alpha": 0.1})
    report = step(src, "report", inputs=[model.as_download()])
    report.run_after(train)
    assert Pipeline(workspace, [prep, train, report]).validate() == []


def test_nested_lists_of_steps_are_flattened(workspace: Workspace, src: Path) -> None:
    a, b, c = step(src, "a"), step(src, "b"), step(src, "c")
    pipeline = Pipeline(workspace, [[a], [b, [c, a]], (c,)])
    assert [s.name for s in pipeline.steps].count("a") == 1
    assert names(pipeline) == {"a", "b", "c"}
    assert pipeline.validate() == []


def test_upstream_producers_are_pulled_in(workspace: Workspace, src: Path) -> None:
    raw, clean, model = PipelineData("raw"), PipelineData("clean"), PipelineData("model")
    fetch = step(src, "fetch", arguments=["--out", raw], outputs=[raw])
    prep = step(src, "prep", inputs=[raw], arguments=["--out", clean], outputs=[clean])
    train = step(src, "train", arguments=["--data", clean.as_input(), "--out", model], outputs=[model])
    report = step(src, "report", arguments=["--model", model])  # an input inferred from arguments
    pipeline = Pipeline(workspace, [report])
    assert names(pipeline) == {"fetch", "prep", "train", "report"}
    assert pipeline.validate() == []
    assert fetch in pipeline.steps and prep in pipeline.steps and train in pipeline.steps


def test_run_after_steps_are_pulled_in(workspace: Workspace, src: Path) -> None:
    first, second = step(src, "first"), step(src, "second")
    second.run_after(first)
    pipeline = Pipeline(workspace, [second])
    assert names(pipeline) == {"first", "second"}
    assert pipeline.validate() == []


# -- one problem at a time --------------------------------------------------------------------


def test_no_steps(workspace: Workspace) -> None:
    assert "no steps" in only_problem(Pipeline(workspace, []))


def test_cycle_through_run_after(workspace: Workspace, src: Path) -> None:
    a, b = step(src, "alpha"), step(src, "beta")
    a.run_after(b)
    b.run_after(a)
    problem = only_problem(Pipeline(workspace, [a]))
    assert "cycle" in problem and "'alpha'" in problem and "'beta'" in problem


def test_a_step_that_runs_after_itself(workspace: Workspace, src: Path) -> None:
    a = step(src, "alpha")
    a.run_after(a)
    problem = only_problem(Pipeline(workspace, [a]))
    assert "cycle" in problem and "'alpha'" in problem


def test_cycle_through_data(workspace: Workspace, src: Path) -> None:
    x, y, z = PipelineData("x"), PipelineData("y"), PipelineData("z")
    step(src, "alpha", inputs=[z], outputs=[x])
    step(src, "beta", arguments=["--in", x.as_input()], outputs=[y])
    gamma = step(src, "gamma", arguments=["--in", y], outputs=[z])
    problem = only_problem(Pipeline(workspace, [gamma]))
    assert "cycle" in problem
    for name in ("'alpha'", "'beta'", "'gamma'"):
        assert name in problem


def test_cycle_through_data_and_run_after(workspace: Workspace, src: Path) -> None:
    x = PipelineData("x")
    a = step(src, "alpha", outputs=[x])
    b = step(src, "beta", inputs=[x])
    a.run_after(b)
    problem = only_problem(Pipeline(workspace, [a, b]))
    assert "cycle" in problem and "'alpha'" in problem and "'beta'" in problem


def test_an_input_that_no_step_produces(workspace: Workspace, src: Path) -> None:
    orphan = PipelineData("orphan")
    problem = only_problem(Pipeline(workspace, [step(src, "train", arguments=["--data", orphan.as_download()])]))
    assert problem.startswith("step 'train':")
    assert "'orphan'" in problem and "produced by no step" in problem and "outputs=[...]" in problem


@pytest.mark.parametrize("binding", ["as_input", "as_download"])
def test_a_step_that_reads_its_own_output(workspace: Workspace, src: Path, binding: str) -> None:
    x = PipelineData("x")
    problem = only_problem(Pipeline(workspace, [step(src, "loop", inputs=[getattr(x, binding)()], outputs=[x])]))
    assert problem.startswith("step 'loop':") and "'x' is both an input and an output" in problem


def test_a_step_that_declares_its_own_output_as_input(workspace: Workspace, src: Path) -> None:
    x = PipelineData("x")
    problem = only_problem(Pipeline(workspace, [step(src, "loop", inputs=[x], outputs=[x])]))
    assert problem.startswith("step 'loop':") and "'x' is both an input and an output" in problem


def test_two_steps_writing_one_output(workspace: Workspace, src: Path) -> None:
    shared = PipelineData("shared")
    first = step(src, "first", outputs=[shared])
    second = step(src, "second", outputs=[shared])
    reader = step(src, "reader", inputs=[shared])
    pipeline = Pipeline(workspace, [reader])
    assert names(pipeline) == {"first", "second", "reader"}
    problem = only_problem(pipeline)
    assert "'shared'" in problem and "'first'" in problem and "'second'" in problem
    assert "exactly one producing step" in problem
    assert first in pipeline.steps and second in pipeline.steps


def test_two_outputs_of_one_step_with_the_same_name(workspace: Workspace, src: Path) -> None:
    pipeline = Pipeline(workspace, [step(src, "train", outputs=[PipelineData("model"),
                                                                 PipelineData("other", output_name="model")])])
    problem = only_problem(pipeline)
    assert problem.startswith("step 'train':") and "two outputs are named 'model'" in problem


def test_a_missing_script(workspace: Workspace, src: Path) -> None:
    pipeline = Pipeline(workspace, [PythonScriptStep("missing.py", name="train", source_directory=src)])
    problem = only_problem(pipeline)
    assert problem.startswith("step 'train':")
    assert "'missing.py'" in problem and str(src.resolve()) in problem


def test_a_missing_source_directory(workspace: Workspace, tmp_path: Path) -> None:
    nowhere = tmp_path / "no_such_folder"
    pipeline = Pipeline(workspace, [PythonScriptStep("step.py", name="train", source_directory=nowhere)])
    problem = only_problem(pipeline)
    assert problem.startswith("step 'train':")
    assert str(nowhere.resolve()) in problem and "does not exist" in problem


def test_duplicate_step_names(workspace: Workspace, src: Path) -> None:
    problem = only_problem(Pipeline(workspace, [step(src, "train"), step(src, "train")]))
    assert "2 steps are named 'train'" in problem and "distinct name=" in problem


@pytest.mark.parametrize("how", ["compute_target", "runconfig.target"])
def test_an_unknown_compute_target(workspace: Workspace, src: Path, how: str) -> None:
    if how == "compute_target":
        s = step(src, "train", compute_target="gpu-cluster")
    else:
        rc = RunConfiguration()
        rc.target = "gpu-cluster"
        s = step(src, "train", runconfig=rc)
    problem = only_problem(Pipeline(workspace, [s]))
    assert problem.startswith("step 'train':")
    assert "'gpu-cluster'" in problem and "known: local" in problem


def test_a_registered_compute_target_is_known(workspace: Workspace, src: Path) -> None:
    target = ComputeTarget.create(workspace, "cpu", LocalCompute.provisioning_configuration(max_concurrency=2))
    assert Pipeline(workspace, [step(src, "a", compute_target=target), step(src, "b", compute_target="cpu")]
                    ).validate() == []


@pytest.mark.parametrize("duration", [0, -1, -0.5, "600", True])
def test_a_bad_max_run_duration(workspace: Workspace, src: Path, duration: object) -> None:
    rc = RunConfiguration()
    rc.max_run_duration_seconds = duration  # type: ignore[assignment]
    problem = only_problem(Pipeline(workspace, [step(src, "train", runconfig=rc)]))
    assert problem.startswith("step 'train':")
    assert "max_run_duration_seconds must be a positive number of seconds" in problem
    assert repr(duration) in problem


def test_bad_runconfig_environment_variables_and_node_count(workspace: Workspace, src: Path) -> None:
    rc = RunConfiguration()
    rc.environment_variables = ["MODE=fast"]  # type: ignore[assignment]
    rc.node_count = 4
    problems = Pipeline(workspace, [step(src, "train", runconfig=rc)]).validate()
    assert len(problems) == 2, problems
    assert all(p.startswith("step 'train':") for p in problems)
    assert any("environment_variables must be a dict" in p for p in problems)
    assert any("node_count=4" in p for p in problems)


def test_an_interpreter_that_does_not_exist(workspace: Workspace, src: Path, tmp_path: Path) -> None:
    interpreter = RunConfiguration()
    interpreter.environment.python.interpreter_path = str(tmp_path / "no-python")
    problem = only_problem(Pipeline(workspace, [step(src, "elsewhere", runconfig=interpreter)]))
    assert problem.startswith("step 'elsewhere':") and "interpreter_path" in problem


def test_an_output_on_an_unregistered_datastore(workspace: Workspace, src: Path) -> None:
    out = PipelineData("model", datastore="no_such_store")
    problem = only_problem(Pipeline(workspace, [step(src, "train", outputs=[out])]))
    assert problem.startswith("step 'train':") and "'model'" in problem and "'no_such_store'" in problem


def test_a_runconfig_environment_that_is_not_an_environment(workspace: Workspace, src: Path) -> None:
    rc = RunConfiguration()
    rc.environment = "my-env"  # type: ignore[assignment]
    problem = only_problem(Pipeline(workspace, [step(src, "train", runconfig=rc)]))
    assert problem.startswith("step 'train':") and "Environment" in problem


@pytest.mark.parametrize("target", [5, ["local"]])
def test_a_runconfig_target_of_the_wrong_type(workspace: Workspace, src: Path, target: object) -> None:
    rc = RunConfiguration()
    rc.target = target
    problem = only_problem(Pipeline(workspace, [step(src, "train", runconfig=rc)]))
    assert problem.startswith("step 'train':") and "target" in problem


def test_an_interpreter_path_of_the_wrong_type(workspace: Workspace, src: Path) -> None:
    rc = RunConfiguration()
    rc.environment.python.interpreter_path = 5  # type: ignore[assignment]
    problem = only_problem(Pipeline(workspace, [step(src, "train", runconfig=rc)]))
    assert problem.startswith("step 'train':") and "interpreter_path" in problem


def test_two_inputs_with_the_same_name(workspace: Workspace, src: Path) -> None:
    first, second = PipelineData("data"), PipelineData("data")
    pipeline = Pipeline(workspace, [step(src, "one", outputs=[first]), step(src, "two", outputs=[second]),
                                    step(src, "both", arguments=["--a", first, "--b", second])])
    with pytest.raises(PipelineValidationError) as info:
        Experiment(workspace, "exp").submit(pipeline)
    assert any("'both'" in p and "'data'" in p for p in info.value.problems)


def test_one_input_name_given_two_ways_is_refused_not_picked(workspace: Workspace, src: Path) -> None:
    from cairn import Dataset

    data = PipelineData("data")
    twice = Pipeline(workspace, [step(src, "make", outputs=[data]),
                                 step(src, "read", arguments=["--a", data.as_mount(), "--b", data.as_download()])])
    assert "2 different inputs are named 'data'" in only_problem(twice)
    for declared, referred in [(lambda d: d, lambda d: d.as_input()), (lambda d: d.as_download(), lambda d: d),
                               (lambda d: d, lambda d: d.as_download())]:
        again = PipelineData("data")  # the same input given the same way, or once as such: one input
        same = Pipeline(workspace, [step(src, "make", outputs=[again]),
                                    step(src, "read", inputs=[declared(again)], arguments=["--a", referred(again)])])
        assert same.validate() == [], same.validate()
        modes = {i.name: i.mode for s in same._compile()[0].steps if s.name == "read" for i in s.inputs}
        assert modes == {"data": "download" if "download" in repr(declared(again)) + repr(referred(again))
                         else "mount"}
    store = workspace.get_default_datastore()
    for folder in ("one", "two"):
        (Path(store.root) / folder).mkdir()
        (Path(store.root) / folder / "f.txt").write_text(folder)
    one, two = Dataset.File.from_files((store, "one")), Dataset.File.from_files((store, "two"))
    for a, b in [(one.as_named_input("x"), two.as_named_input("x")),
                 (one.as_named_input("x").as_mount(), one.as_named_input("x").as_download())]:
        assert "2 different inputs are named 'x'" in only_problem(Pipeline(workspace, [step(src, "use", arguments=[a, b])]))
    named = one.as_named_input("x")
    assert Pipeline(workspace, [step(src, "use", inputs=[named.as_download()], arguments=[named])]).validate() == []
    copy = Dataset.File.from_files((store, "one"))  # another object of the same dataset, given the same way
    assert Pipeline(workspace, [step(src, "use", arguments=[one.as_named_input("x").as_mount(),
                                                            copy.as_named_input("x").as_mount()])]).validate() == []


# -- every problem at once --------------------------------------------------------------------


def test_validate_lists_every_problem_and_submit_raises_them_all(workspace: Workspace, src: Path,
                                                                 tmp_path: Path) -> None:
    shared, orphan = PipelineData("shared"), PipelineData("orphan")
    slow = RunConfiguration()
    slow.max_run_duration_seconds = 0
    a, b = step(src, "ping"), step(src, "pong")
    a.run_after(b)
    b.run_after(a)
    steps = [
        PythonScriptStep("missing.py", name="no_script", source_directory=src),
        PythonScriptStep("step.py", name="no_folder", source_directory=tmp_path / "absent"),
        step(src, "bad_target", compute_target="gpu"),
        step(src, "bad_runconfig", runconfig=slow),
        step(src, "needs_orphan", inputs=[orphan]),
        step(src, "twin"), step(src, "twin"),
        step(src, "writer_one", outputs=[shared]), step(src, "writer_two", outputs=[shared]),
        [a],
    ]
    pipeline = Pipeline(workspace, steps)
    problems = pipeline.validate()
    assert len(problems) == 8, problems
    for name in ("no_script", "no_folder", "bad_target", "bad_runconfig", "needs_orphan"):
        assert any(p.startswith(f"step '{name}':") for p in problems), name
    assert any("'twin'" in p for p in problems)
    assert any("'writer_one'" in p and "'writer_two'" in p for p in problems)
    assert any("cycle" in p and "'ping'" in p and "'pong'" in p for p in problems)

    experiment = Experiment(workspace, "invalid")
    with pytest.raises(PipelineValidationError) as info:
        experiment.submit(pipeline)
    assert isinstance(info.value, CairnError)
    assert info.value.problems == problems
    assert "8 problem(s)" in str(info.value)
    for p in problems:
        assert p in str(info.value)
    assert experiment.get_runs() == []  # nothing was queued
    assert "invalid" not in workspace.experiments


@pytest.mark.parametrize("variables", [{"1 BAD=": "x"}, {"": "x"}, {"OK": "a\x00b"}])
def test_a_variable_no_process_can_be_given_is_refused_at_submit(workspace: Workspace, src: Path,
                                                                   variables: dict[str, str]) -> None:
    from cairn import Environment

    rc = RunConfiguration()
    rc.environment_variables = variables
    problems = Pipeline(workspace, [step(src, "s", runconfig=rc)]).validate()
    assert any("environment variable" in p and "step 's'" in p for p in problems), problems
    env = Environment("with-vars")
    env.environment_variables = variables
    rc = RunConfiguration()
    rc.environment = env
    with pytest.raises(CairnError, match="environment 'with-vars': .*environment variable"):
        Experiment(workspace, "vars").submit(Pipeline(workspace, [step(src, "s", runconfig=rc)]))


@pytest.mark.parametrize("name", ["line\nbreak", "tab\there", "x" * 256])
def test_an_environment_name_that_would_break_tables_and_messages_is_refused(name: str) -> None:
    from cairn import Environment, UserInputError

    with pytest.raises(UserInputError, match="Environment name"):
        Environment(name)


def test_the_local_target_stays_this_machine(workspace: Workspace) -> None:
    from cairn import RayCompute

    with pytest.raises(CairnError, match="'local' is the built-in target"):
        ComputeTarget.attach(workspace, "local", RayCompute.attach_configuration(address="127.0.0.1:1"))
    assert ComputeTarget(workspace, "local").type == "local"
    ComputeTarget.create(workspace, "local", LocalCompute.provisioning_configuration(max_concurrency=1))  # re-made
    assert ComputeTarget(workspace, "local").config["max_concurrency"] == 1


def test_submitting_lists_the_datastores_once_and_outputs_go_to_the_default(
        workspace: Workspace, src: Path, tmp_path: Path, monkeypatch) -> None:
    """Validating and compiling share one listing of the datastores (each listing is a round trip to
    the agent); an output without a datastore still goes to the workspace's default one."""
    from cairn import Datastore

    other = tmp_path / "other"
    other.mkdir()
    Datastore.register_local_folder(workspace, "other", other)
    workspace._backend.make_default_datastore("other")
    backend = workspace._backend
    backend.snapshots([str(src)])  # (a new snapshot looks for an object store to upload to)
    listings: list[int] = []
    real = backend.list_datastores

    def counted():
        listings.append(1)
        return real()

    monkeypatch.setattr(backend, "list_datastores", counted, raising=False)
    out = PipelineData("out")
    run = Experiment(workspace, "listing").submit(Pipeline(workspace, [step(src, "a", outputs=[out])]))
    assert len(listings) == 1
    assert run.wait_for_completion(show_output=False) == "Completed"
    (output,) = run.get_steps()[0].get_outputs().values()
    assert output.datastore_name == "other"


def test_an_invalid_pipeline_is_refused_before_any_snapshot_is_taken(
        workspace: Workspace, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the submitting process (no agent serves the workspace), the snapshots are taken only for
    a pipeline that has no problem: a mistake is told without hashing the source folders first."""
    from cairn.backend.local import LocalBackend

    assert isinstance(workspace._backend, LocalBackend)
    taken: list[list[str]] = []
    snapshots = LocalBackend.snapshots

    def counted(self: LocalBackend, folders: list[str], *args: object) -> dict[str, str]:
        taken.append(folders)
        return snapshots(self, folders, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalBackend, "snapshots", counted)
    bad = Pipeline(workspace, [step(src, "a", compute_target="nowhere")])
    with pytest.raises(PipelineValidationError, match="nowhere"):
        Experiment(workspace, "invalid").submit(bad)
    assert taken == []
    spec, _ = Pipeline(workspace, [step(src, "a")])._compile()
    assert taken == [[str(src)]] and spec.steps[0].snapshot


def test_a_compiled_spec_is_what_its_json_reads_back(workspace: Workspace, src: Path) -> None:
    """The agent that records a run schedules it from the spec as sent (not read back): that spec
    must equal its JSON's, or its fingerprints would differ from a resumed run's (a reading with
    int keys: JSON makes them strings)."""
    from cairn.core.spec import GraphSpec

    data = PipelineData("table")
    first = step(src, "first", outputs=[data], arguments=["--out", data])
    reading = data.as_input(input_name="table")
    reading.read_as = {"kind": "delimited", "set_column_types": {10: "int", 2: "str"}}
    second = step(src, "second", arguments=["--in", reading], params={"n": 3, "flag": True})
    spec, _ = Pipeline(workspace, [first, second])._compile()
    assert GraphSpec.from_json(spec.to_json()) == spec

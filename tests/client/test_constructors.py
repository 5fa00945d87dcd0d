"""Bad arguments to the public constructors and functions of pipeline authoring.

Every wrong value must raise UserInputError (a ValueError and a CairnError) whose message names the
object (the step, the data) and the argument, and says what is allowed; never an AttributeError,
KeyError or TypeError from deep inside.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cairn import (
    CairnError,
    Environment,
    Experiment,
    Pipeline,
    PipelineData,
    PythonScriptStep,
    RunConfiguration,
    UserInputError,
    Workspace,
)
from cairn.data.pipeline_data import PipelineDataInput
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout


def test_user_input_error_is_a_value_error_and_a_cairn_error() -> None:
    assert issubclass(UserInputError, ValueError)
    assert issubclass(UserInputError, CairnError)


# -- PipelineData ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prepped", "_private", "A1_b2", "x" * 255])
def test_pipeline_data_accepts_valid_names(name: str) -> None:
    data = PipelineData(name)
    assert data.name == name
    assert data.output_name == name
    assert data.datastore is None and data.datastore_name is None


@pytest.mark.parametrize("name", ["a-b", "1x", "", "a b", "a.b", "x" * 256, "dir/name"])
def test_pipeline_data_rejects_invalid_names(name: str) -> None:
    with pytest.raises(UserInputError) as info:
        PipelineData(name)
    message = str(info.value)
    assert "PipelineData name" in message
    assert repr(name) in message
    assert "letters, digits and underscores" in message


@pytest.mark.parametrize("name", [3, None, 1.5, b"bytes", ["x"]])
def test_pipeline_data_rejects_names_of_the_wrong_type(name: object) -> None:
    with pytest.raises(UserInputError) as info:
        PipelineData(name)  # type: ignore[arg-type]
    message = str(info.value)
    assert "PipelineData name" in message
    assert "must be of type str" in message
    assert type(name).__name__ in message


def test_pipeline_data_rejects_a_name_with_a_trailing_newline() -> None:
    with pytest.raises(UserInputError):
        PipelineData("prepped\n")


def test_pipeline_data_output_name() -> None:
    assert PipelineData("prepped", output_name="prepared_out").output_name == "prepared_out"
    with pytest.raises(UserInputError) as info:
        PipelineData("prepped", output_name="prepared-out")
    assert "output_name" in str(info.value) and "'prepared-out'" in str(info.value)
    with pytest.raises(UserInputError) as info:
        PipelineData("prepped", output_name=7)  # type: ignore[arg-type]
    assert "output_name" in str(info.value) and "int" in str(info.value)


@pytest.mark.parametrize("output_name", ["", 0])
def test_pipeline_data_rejects_a_falsy_output_name(output_name: object) -> None:
    with pytest.raises(UserInputError):
        PipelineData("prepped", output_name=output_name)  # type: ignore[arg-type]


def test_pipeline_data_datastore_by_object_or_name(workspace: Workspace) -> None:
    store = workspace.get_default_datastore()
    assert PipelineData("prepped", datastore=store).datastore_name == "workspaceblobstore"
    assert PipelineData("prepped", datastore="workspaceblobstore").datastore_name == "workspaceblobstore"


@pytest.mark.parametrize("datastore", [5, ["workspaceblobstore"], object()])
def test_pipeline_data_rejects_a_bad_datastore(datastore: object) -> None:
    with pytest.raises(UserInputError) as info:
        PipelineData("prepped", datastore=datastore)
    message = str(info.value)
    assert "'prepped'" in message
    assert "datastore must be a Datastore or a datastore name" in message
    assert type(datastore).__name__ in message


def test_pipeline_data_bindings() -> None:
    data = PipelineData("prepped")
    for binding, mode in ((data.as_input(), "mount"), (data.as_mount(), "mount"), (data.as_download(), "download")):
        assert isinstance(binding, PipelineDataInput)
        assert binding.data is data
        assert binding.mode == mode
        assert binding.input_name == "prepped"
    assert data.as_input("training_data").input_name == "training_data"
    assert data.as_mount(input_name="mounted").input_name == "mounted"
    download = data.as_download("local_copy", path_on_compute="data/in")
    assert (download.input_name, download.path_on_compute) == ("local_copy", "data/in")


@pytest.mark.parametrize("make", [
    lambda d: d.as_input("bad-name"),
    lambda d: d.as_mount("1st"),
    lambda d: d.as_download("has space"),
    lambda d: d.as_input(5),
], ids=["as_input", "as_mount", "as_download", "as_input-int"])
def test_pipeline_data_bindings_reject_bad_input_names(make: Callable[[PipelineData], object]) -> None:
    with pytest.raises(UserInputError) as info:
        make(PipelineData("prepped"))
    assert "input_name" in str(info.value)


def test_pipeline_data_binding_rejects_an_empty_input_name() -> None:
    with pytest.raises(UserInputError):
        PipelineData("prepped").as_input("")


def test_pipeline_data_input_rejects_bad_data_and_mode() -> None:
    with pytest.raises(UserInputError) as info:
        PipelineDataInput("prepped", None, "mount")  # type: ignore[arg-type]
    assert "PipelineData" in str(info.value) and "str" in str(info.value)
    with pytest.raises(UserInputError) as info:
        PipelineDataInput(PipelineData("prepped"), None, "copy")
    message = str(info.value)
    assert "'copy'" in message
    for mode in ("mount", "download", "direct"):
        assert mode in message


# -- PythonScriptStep -----------------------------------------------------------------------


def test_step_with_every_argument_of_the_right_type(tmp_path: Path) -> None:
    prepped, model = PipelineData("prepped"), PipelineData("model")
    rc = RunConfiguration()
    step = PythonScriptStep("train.py", name="train", arguments=("--data", prepped.as_input(), "--out", model, 3, 0.5,
                                                                 True, tmp_path),
                            compute_target="local", runconfig=rc, inputs=[prepped], outputs=[model],
                            params={"alpha": 0.1, "epochs": 3, "flag": True, "label": "x"},
                            source_directory=tmp_path, allow_reuse=False, version="2")
    assert step.name == "train" and step.script_name == "train.py"
    assert isinstance(step.arguments, list) and len(step.arguments) == 8
    assert step.runconfig is rc
    assert step.params == {"alpha": 0.1, "epochs": 3, "flag": True, "label": "x"}
    assert step.source_directory == str(tmp_path.resolve())
    assert step.allow_reuse is False and step.version == "2"
    assert [b.data for b in step.input_bindings()] == [prepped]  # the output in arguments is not an input
    assert step in model._producers


def test_step_defaults() -> None:
    step = PythonScriptStep("train.py")
    assert step.name == "train.py"
    assert step.arguments == [] and step.inputs == [] and step.outputs == [] and step.params == {}
    assert isinstance(step.runconfig, RunConfiguration)
    assert step.source_directory == str(Path(".").resolve())
    assert step.allow_reuse is True and step.version is None


def test_step_script_in_a_subfolder_with_a_name() -> None:
    step = PythonScriptStep("scripts/train.py", name="train")
    assert (step.name, step.script_name) == ("train", "scripts/train.py")


def test_step_script_in_a_subfolder_without_a_name() -> None:
    step = PythonScriptStep("scripts/train.py")
    assert step.script_name == "scripts/train.py"


def test_step_infers_inputs_from_arguments() -> None:
    raw, mounted, downloaded = PipelineData("raw"), PipelineData("mounted"), PipelineData("downloaded")
    step = PythonScriptStep("s.py", arguments=[raw, mounted.as_mount(), downloaded.as_download("local")])
    bindings = {b.input_name: b for b in step.input_bindings()}
    assert set(bindings) == {"raw", "mounted", "local"}
    assert bindings["local"].mode == "download"


def test_step_hash_paths_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="hash_paths"):
        PythonScriptStep("train.py", hash_paths=["."])


@pytest.mark.parametrize("script_name", ["", "   ", "/abs/train.py", "../train.py", "sub/../../train.py",
                                         "..\\train.py"])
def test_step_rejects_a_script_name_outside_the_source_directory(script_name: str) -> None:
    with pytest.raises(UserInputError) as info:
        PythonScriptStep(script_name)
    message = str(info.value)
    assert "script_name" in message
    assert repr(script_name) in message
    assert "relative to source_directory" in message


@pytest.mark.parametrize("script_name", [3, None, Path("train.py"), ["train.py"]])
def test_step_rejects_a_script_name_of_the_wrong_type(script_name: object) -> None:
    with pytest.raises(UserInputError) as info:
        PythonScriptStep(script_name)  # type: ignore[arg-type]
    message = str(info.value)
    assert "script_name" in message
    assert "must be of type str" in message
    assert type(script_name).__name__ in message


def test_step_script_name_error_names_the_step_when_it_has_a_name() -> None:
    with pytest.raises(UserInputError, match="'train'"):
        PythonScriptStep(3, name="train")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "   ", "tab\there", "new\nline", "x" * 256])
def test_step_rejects_invalid_names(name: str) -> None:
    with pytest.raises(UserInputError) as info:
        PythonScriptStep("train.py", name=name)
    message = str(info.value)
    assert "step name" in message
    assert repr(name) in message
    assert "1 to 255 characters" in message


@pytest.mark.parametrize("name", [3, 1.5, True, ["train"]])
def test_step_rejects_names_of_the_wrong_type(name: object) -> None:
    with pytest.raises(UserInputError) as info:
        PythonScriptStep("train.py", name=name)  # type: ignore[arg-type]
    message = str(info.value)
    assert "step name" in message and "must be of type str" in message and type(name).__name__ in message


_DATA = PipelineData("some_data")

# (argument, bad value, fragments the message must hold besides "step 'train'")
BAD_STEP_ARGUMENTS: list[tuple[str, object, list[str]]] = [
    ("arguments", "--lr 0.1", ["arguments must be a list", "str"]),
    ("arguments", {"lr": 0.1}, ["arguments must be a list", "dict"]),
    ("arguments", 5, ["arguments must be a list", "int"]),
    ("arguments", ["--lr", None], ["arguments[1]", "NoneType", "allowed are str, int, float, bool, PipelineData"]),
    ("arguments", ["--cfg", {"a": 1}], ["arguments[1]", "dict", "allowed are"]),
    ("arguments", [["nested"]], ["arguments[0]", "list", "allowed are"]),
    ("arguments", [object()], ["arguments[0]", "object", "allowed are"]),
    ("compute_target", 5, ["compute_target must be a ComputeTarget or a target name", "int"]),
    ("compute_target", ["local"], ["compute_target must be a ComputeTarget or a target name", "list"]),
    ("runconfig", "rc", ["runconfig must be a RunConfiguration", "str"]),
    ("runconfig", {"target": "local"}, ["runconfig must be a RunConfiguration", "dict"]),
    ("runconfig", Environment("env"), ["runconfig must be a RunConfiguration", "Environment"]),
    ("inputs", _DATA, ["inputs must be a list", "PipelineData"]),
    ("inputs", "some_data", ["inputs must be a list", "str"]),
    ("inputs", ["some_data"], ["inputs[0]", "str", "allowed are PipelineData"]),
    ("inputs", [_DATA, 3], ["inputs[1]", "int", "allowed are PipelineData"]),
    ("outputs", _DATA, ["outputs must be a list", "PipelineData"]),
    ("outputs", ["some_data"], ["outputs[0]", "str", "outputs must be PipelineData"]),
    ("outputs", [_DATA.as_input()], ["outputs[0]", "PipelineDataInput", "outputs must be PipelineData"]),
    ("params", [("alpha", 0.1)], ["params must be a dict", "list"]),
    ("params", "alpha=0.1", ["params must be a dict", "str"]),
    ("params", {"learning-rate": 0.1}, ["'learning-rate'", "identifier"]),
    ("params", {"": 0.1}, ["''", "identifier"]),
    ("params", {1: 0.1}, ["param name 1", "identifier"]),
    ("params", {"alpha": [0.1]}, ["'alpha'", "str, int, float or bool", "list"]),
    ("params", {"alpha": None}, ["'alpha'", "str, int, float or bool", "NoneType"]),
    ("source_directory", 5, ["source_directory must be a folder path", "int"]),
    ("source_directory", ["src"], ["source_directory must be a folder path", "list"]),
    ("allow_reuse", "yes", ["allow_reuse", "bool", "str"]),
    ("allow_reuse", 1, ["allow_reuse", "bool", "int"]),
    ("allow_reuse", None, ["allow_reuse", "bool", "NoneType"]),
    ("version", 2, ["version must be a str", "int"]),
    ("version", 1.0, ["version must be a str", "float"]),
]


@pytest.mark.parametrize(("argument", "value", "fragments"), BAD_STEP_ARGUMENTS,
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_STEP_ARGUMENTS)])
def test_step_rejects_bad_arguments_naming_step_and_argument(argument: str, value: object,
                                                             fragments: list[str]) -> None:
    with pytest.raises(UserInputError) as info:
        PythonScriptStep("train.py", name="train", **{argument: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert "step 'train'" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("hash_paths", [5, "not-a-list"])
def test_step_rejects_hash_paths_of_the_wrong_type(hash_paths: object) -> None:
    with pytest.raises(UserInputError, match="hash_paths"):
        PythonScriptStep("train.py", name="train", hash_paths=hash_paths)  # type: ignore[arg-type]


def test_step_rejects_a_source_directory_with_a_nul_byte() -> None:
    with pytest.raises(UserInputError, match="step 'train'.*source_directory"):
        PythonScriptStep("train.py", name="train", source_directory="sr\0c")


@pytest.mark.parametrize("other", ["train.py", None, PipelineData("x")])
def test_run_after_rejects_what_is_not_a_step(other: object) -> None:
    step = PythonScriptStep("train.py", name="train")
    with pytest.raises(UserInputError) as info:
        step.run_after(other)  # type: ignore[arg-type]
    assert "run_after expects a step" in str(info.value) and type(other).__name__ in str(info.value)


# -- RunConfiguration and Environment -------------------------------------------------------


def test_run_configuration_attributes() -> None:
    rc = RunConfiguration()
    assert rc.target is None
    assert rc.environment_variables == {}
    assert rc.max_run_duration_seconds is None
    assert isinstance(rc.environment, Environment)
    rc.target = "local"
    rc.environment_variables = {"MODE": "fast"}
    rc.max_run_duration_seconds = 600
    assert rc.validate("train") == []
    rc.max_run_duration_seconds = 0.5
    assert rc.validate("train") == []


@pytest.mark.parametrize(("attribute", "value", "fragment"), [
    ("max_run_duration_seconds", 0, "max_run_duration_seconds must be a positive number of seconds, not 0"),
    ("max_run_duration_seconds", -5, "max_run_duration_seconds must be a positive number of seconds, not -5"),
    ("max_run_duration_seconds", "600", "max_run_duration_seconds must be a positive number of seconds, not '600'"),
    ("max_run_duration_seconds", True, "max_run_duration_seconds must be a positive number of seconds, not True"),
    ("environment_variables", ["A=1"], "environment_variables must be a dict"),
    ("environment", "my-env", "environment must be an Environment, not str"),
    ("node_count", 0, "node_count must be a whole number of at least 1, not 0"),
])
def test_run_configuration_validate_names_step_and_value(attribute: str, value: object, fragment: str) -> None:
    rc = RunConfiguration()
    setattr(rc, attribute, value)
    problems = rc.validate("train")
    assert len(problems) == 1
    assert problems[0].startswith("step 'train': runconfig.")
    assert fragment in problems[0]


def test_run_configuration_rejects_nan_duration() -> None:
    rc = RunConfiguration()
    rc.max_run_duration_seconds = float("nan")
    assert rc.validate("train") != []


@pytest.mark.parametrize("name", [3, None, ["env"]])
def test_environment_rejects_names_of_the_wrong_type(name: object) -> None:
    with pytest.raises(UserInputError, match="Environment name must be of type str"):
        Environment(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "   "])
def test_environment_rejects_empty_names(name: str) -> None:
    with pytest.raises(UserInputError, match="Environment name must not be empty"):
        Environment(name)


# -- Pipeline constructor -------------------------------------------------------------------


@pytest.mark.parametrize("workspace_value", [None, "ws", Path(".")])
def test_pipeline_rejects_a_workspace_that_is_not_one(workspace_value: object) -> None:
    with pytest.raises(UserInputError) as info:
        Pipeline(workspace_value, [PythonScriptStep("train.py")])  # type: ignore[arg-type]
    assert "Pipeline workspace must be a Workspace" in str(info.value)
    assert type(workspace_value).__name__ in str(info.value)


@pytest.mark.parametrize(("steps", "where", "kind"), [
    (None, "steps", "NoneType"),
    ("train.py", "steps", "str"),
    ([PythonScriptStep("a.py"), 5], "steps[1]", "int"),
    ([PythonScriptStep("a.py"), [PythonScriptStep("b.py"), "c.py"]], "steps[1][1]", "str"),
    ({"train": PythonScriptStep("a.py")}, "steps", "dict"),
])
def test_pipeline_rejects_steps_that_are_not_steps(workspace: Workspace, steps: object, where: str,
                                                   kind: str) -> None:
    with pytest.raises(UserInputError) as info:
        Pipeline(workspace, steps)
    message = str(info.value)
    assert f"Pipeline {where} is a {kind}" in message
    assert "PythonScriptStep" in message


def test_pipeline_accepts_a_single_step(workspace: Workspace) -> None:
    step = PythonScriptStep("train.py")
    assert Pipeline(workspace, step).steps == [step]


# -- Experiment -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["exp", "exp-1", "Exp_2", "1abc", "a" * 255])
def test_experiment_accepts_valid_names(workspace: Workspace, name: str) -> None:
    experiment = Experiment(workspace, name)
    assert experiment.name == name and experiment.workspace == workspace


@pytest.mark.parametrize("name", ["", "-exp", "_exp", "my exp", "a/b", "a.b", "a" * 256])
def test_experiment_rejects_invalid_names(workspace: Workspace, name: str) -> None:
    with pytest.raises(UserInputError) as info:
        Experiment(workspace, name)
    message = str(info.value)
    assert "experiment name" in message
    assert repr(name) in message
    assert "letters, digits, '-' and '_'" in message


@pytest.mark.parametrize("name", [3, None, ["exp"]])
def test_experiment_rejects_names_of_the_wrong_type(workspace: Workspace, name: object) -> None:
    with pytest.raises(UserInputError, match="experiment name must be of type str"):
        Experiment(workspace, name)  # type: ignore[arg-type]


def test_experiment_rejects_a_name_with_a_trailing_newline(workspace: Workspace) -> None:
    with pytest.raises(UserInputError):
        Experiment(workspace, "exp\n")


@pytest.mark.parametrize("workspace_value", [None, "ws"])
def test_experiment_rejects_a_workspace_that_is_not_one(workspace_value: object) -> None:
    with pytest.raises(UserInputError, match="Experiment workspace must be of type Workspace"):
        Experiment(workspace_value, "exp")  # type: ignore[arg-type]


@pytest.fixture
def sound_pipeline(workspace: Workspace, write_script: Callable[..., Path]) -> Pipeline:
    src = write_script("train.py", "print('train')\n")
    return Pipeline(workspace, [PythonScriptStep("train.py", name="train", source_directory=src)])


@pytest.mark.parametrize("config", ["pipeline", None, 5], ids=["str", "None", "int"])
def test_submit_rejects_what_is_not_a_pipeline(workspace: Workspace, config: object) -> None:
    with pytest.raises(UserInputError) as info:
        Experiment(workspace, "exp").submit(config)
    assert "Experiment.submit expects a Pipeline" in str(info.value)
    assert type(config).__name__ in str(info.value)


def test_submit_rejects_a_step_or_a_list_of_steps(workspace: Workspace, sound_pipeline: Pipeline) -> None:
    step = sound_pipeline.steps[0]
    for config in (step, [step]):
        with pytest.raises(UserInputError, match=f"expects a Pipeline, not {type(config).__name__}"):
            Experiment(workspace, "exp").submit(config)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"tags": ["a", "b"]}, "tags must be a dict, not list"),
    ({"tags": "team=ml"}, "tags must be a dict, not str"),
    ({"regenerate_outputs": "yes"}, "regenerate_outputs must be of type bool, not str"),
    ({"regenerate_outputs": 1}, "regenerate_outputs must be of type bool, not int"),
    ({"continue_on_step_failure": None}, "continue_on_step_failure must be of type bool, not NoneType"),
    ({"continue_on_step_failure": "no"}, "continue_on_step_failure must be of type bool, not str"),
    ({"pipeline_params": {"a": 1}}, "unexpected argument(s): pipeline_params"),
])
def test_submit_rejects_bad_arguments(workspace: Workspace, sound_pipeline: Pipeline, kwargs: dict[str, object],
                                      fragment: str) -> None:
    experiment = Experiment(workspace, "exp")
    with pytest.raises(UserInputError) as info:
        experiment.submit(sound_pipeline, **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert experiment.get_runs() == []


def test_submit_rejects_a_pipeline_of_another_workspace(workspace: Workspace, sound_pipeline: Pipeline,
                                                        tmp_path: Path) -> None:
    other = Workspace.create(tmp_path / "other")
    try:
        with pytest.raises(UserInputError, match="another workspace"):
            Experiment(other, "exp").submit(sound_pipeline)
        assert Experiment(other, "exp").get_runs() == []
    finally:
        stop_agent(WorkspaceLayout(other.location))

"""Experiment: a named group of runs. ``submit`` queues a pipeline run and returns at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cairn.client.run import PipelineRun  # (what submit returns: loaded with the class, not in the first submit)
from cairn.core.errors import UserInputError
from cairn.core.names import check_experiment_name, check_type

# Pipeline runs submitted by this process, in order (`cairn run FILE` follows them).
# The runs a pipeline file submits under `cairn run` (which sets a list here, to follow them); None
# otherwise: a notebook that submits run after run must not keep each one, and its workspace, alive.
SUBMITTED: list[PipelineRun] | None = None

if TYPE_CHECKING:
    from cairn.client.run import Run
    from cairn.client.workspace import Workspace


class Experiment:
    def __init__(self, workspace: Workspace, name: str, **ignored: Any) -> None:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "Experiment workspace")
        self.workspace = workspace
        self.name = check_experiment_name(name)

    def submit(self, config: Any, tags: dict[str, Any] | None = None, regenerate_outputs: bool = False,
               continue_on_step_failure: bool = False, **kwargs: Any) -> PipelineRun:
        """Queue ``config`` (a Pipeline) and return its PipelineRun without waiting."""
        from cairn.client.pipeline import Pipeline

        if not isinstance(config, Pipeline):
            raise UserInputError(f"Experiment.submit expects a Pipeline, not {type(config).__name__}")
        if config.workspace != self.workspace:
            raise UserInputError("the pipeline belongs to another workspace than the experiment")
        if tags is not None and not isinstance(tags, dict):
            raise UserInputError(f"tags must be a dict, not {type(tags).__name__}")
        check_type(regenerate_outputs, bool, "regenerate_outputs")
        check_type(continue_on_step_failure, bool, "continue_on_step_failure")
        unknown = set(kwargs) - {"pipeline_parameters", "credential_passthrough"}
        if unknown:
            raise UserInputError(f"Experiment.submit got unexpected argument(s): {', '.join(sorted(unknown))}")
        if kwargs.get("pipeline_parameters"):
            raise UserInputError("pipeline_parameters are not supported by this version of Cairn (there is no "
                                 "PipelineParameter yet): pass values as step arguments or params instead")
        spec, step_props = config._compile()
        first = next(iter(step_props.values()), {})  # the pipeline run carries the git facts only
        run_props = {k: v for k, v in first.items() if k.startswith(("cairn.git.", "mlflow."))}
        run_id, _ = self.workspace._backend.submit_pipeline(
            self.name, config.description or "pipeline", spec,
            tags={str(k): "" if v is None else str(v) for k, v in (tags or {}).items()},
            properties=run_props, step_properties=step_props,
            regenerate_outputs=regenerate_outputs, continue_on_step_failure=continue_on_step_failure)
        run = PipelineRun(self, run_id)
        run._pipeline_run = True
        if SUBMITTED is not None:
            SUBMITTED.append(run)
        return run

    def get_runs(self) -> list[Run]:
        from cairn.client.run import Run

        return [Run._from_record(self.workspace, r) for r in self.workspace._backend.list_runs(self.name, 1000)]

    @classmethod
    def list(cls, workspace: Workspace) -> list[Experiment]:
        return list(workspace.experiments.values())

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, workspace={self.workspace.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Experiment) and (other.workspace, other.name) == (self.workspace, self.name)

    def __hash__(self) -> int:
        return hash((self.workspace.location, self.name))

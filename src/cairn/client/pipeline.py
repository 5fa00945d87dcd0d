"""Pipeline: a graph of steps. Validation collects every problem; submit compiles to a graph spec."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cairn.client.dataset import DatasetConsumptionConfig
from cairn.client.environment import Environment
from cairn.client.steps import PythonScriptStep
from cairn.core.errors import PathNotFoundError, PipelineValidationError, UserInputError
from cairn.core.spec import Argument, DatasetInputSpec, GraphSpec, InputSpec, OutputSpec, StepSpec
from cairn.data.pipeline_data import PipelineData, PipelineDataInput
from cairn.environments.spec import check_buildable, spec_digest
from cairn.storage.git import git_properties_of

if TYPE_CHECKING:
    from cairn.client.workspace import Workspace


def _flatten(steps: Any, out: list[PythonScriptStep], where: str = "steps", seen: set[int] | None = None) -> None:
    seen = {id(s) for s in out} if seen is None else seen  # by identity: a step listed twice is one step
    if isinstance(steps, (list, tuple)):
        for i, s in enumerate(steps):
            _flatten(s, out, f"{where}[{i}]", seen)
    elif isinstance(steps, PythonScriptStep):
        if id(steps) not in seen:
            seen.add(id(steps))
            out.append(steps)
    else:
        raise UserInputError(f"Pipeline {where} is a {type(steps).__name__}; a pipeline's steps must be "
                             f"PythonScriptStep objects (lists of them may be nested)")


class Pipeline:
    """Steps to run together. Upstream producers of their inputs are pulled in when not listed."""

    def __init__(self, workspace: Workspace, steps: Any, description: str | None = None,
                 default_datastore: Any = None, default_source_directory: str | None = None,
                 **ignored: Any) -> None:
        from cairn.client.workspace import Workspace

        if not isinstance(workspace, Workspace):
            raise UserInputError(f"Pipeline workspace must be a Workspace, not {type(workspace).__name__}")
        self.workspace = workspace
        self.description = description
        self.default_datastore = default_datastore
        listed: list[PythonScriptStep] = []
        _flatten(steps, listed)
        self.steps = _upstream_first(_with_producers(listed))
        # A pipeline is built to be submitted: let the agent load meanwhile (it exits when idle).
        workspace._backend.prestart()

    # -- validation ------------------------------------------------------------------------

    def validate(self) -> list[str]:
        """Every problem of the pipeline, each naming its step; an empty list when it is sound."""
        return self._problems(self.workspace._backend.list_datastores() if self.steps else [], {})

    def _problems(self, datastores: list[dict[str, Any]], env_specs: dict[int, dict[str, Any]],
                  compute_targets: list[dict[str, Any]] | None = None) -> list[str]:
        """``validate`` with the workspace's datastores (and compute targets) as listed (``_compile``
        lists them before its snapshots start: asked while they are taken, a call waits for them);
        fills ``env_specs`` (id of an Environment -> its spec), which ``_compile`` reuses: the steps
        of a pipeline usually share one environment, whose spec checks its interpreter's files."""
        problems: list[str] = []
        env_problems: dict[int, list[str]] = {}
        steps = self.steps
        if not steps:
            return ["the pipeline has no steps; pass at least one step in steps=[...]"]
        seen: dict[str, int] = {}
        for s in steps:
            seen[s.name] = seen.get(s.name, 0) + 1
        for name, count in seen.items():
            if count > 1:
                problems.append(f"{count} steps are named {name!r}; give each step a distinct name=")
        if compute_targets is None:
            compute_targets = self.workspace._backend.list_compute_targets()
        kinds = {c["name"]: c["kind"] for c in compute_targets}
        targets = set(kinds)
        stores = {d["name"]: d["kind"] for d in datastores}
        producers: dict[int, list[PythonScriptStep]] = {}
        for s in steps:
            for o in s.outputs:
                producers.setdefault(id(o), []).append(s)
        listed = {id(s) for s in steps}
        for s in steps:
            who = f"step {s.name!r}"
            if os.path.isfile(os.path.join(s.source_directory, s.script_name)):
                pass  # one stat for the usual case
            elif not os.path.isdir(s.source_directory):
                problems.append(f"{who}: source_directory {s.source_directory!r} does not exist")
            else:
                problems.append(f"{who}: script {s.script_name!r} is not in source_directory {s.source_directory!r}")
            rc_problems = s.runconfig.validate(s.name)
            problems += rc_problems
            target = _target_name(s) if not any("runconfig.target" in p for p in rc_problems) else None
            if target is not None and target not in targets:
                problems.append(f"{who}: compute target {target!r} does not exist in the workspace "
                                f"(known: {', '.join(sorted(targets))})")
            elif target is not None and kinds.get(target) != "ray" and s.runconfig.node_count != 1 \
                    and not any("node_count" in p for p in rc_problems):
                problems.append(f"{who}: runconfig.node_count={s.runconfig.node_count} needs a Ray target (it "
                                f"reserves that many nodes); target {target!r} runs a step on this machine")
            environment = s.runconfig.environment
            if isinstance(environment, Environment):
                if id(environment) not in env_problems:
                    try:
                        env_specs[id(environment)] = environment.to_spec()
                    except UserInputError as exc:
                        env_problems[id(environment)] = [str(exc)]
                    else:
                        env_problems[id(environment)] = check_buildable(env_specs[id(environment)], environment.name)
                problems += [f"{who}: {p}" for p in env_problems[id(environment)]]
            out_names: dict[str, int] = {}
            for o in s.outputs:
                out_names[o.output_name] = out_names.get(o.output_name, 0) + 1
                ds = o.datastore_name
                if ds is not None and ds not in stores:
                    problems.append(f"{who}: output {o.name!r} names datastore {ds!r}, which is not registered")

            for n, c in out_names.items():
                if c > 1:
                    problems.append(f"{who}: two outputs are named {n!r}")
            bindings = s.input_bindings()
            names_seen: dict[str, int] = {}
            for b in bindings:
                names_seen[b.input_name] = names_seen.get(b.input_name, 0) + 1
            for d in s.dataset_bindings():
                names_seen[d.name] = names_seen.get(d.name, 0) + 1
                owner = d.dataset._workspace
                if owner is not None and owner != self.workspace:
                    problems.append(f"{who}: dataset input {d.name!r} belongs to another workspace")
            for n, c in names_seen.items():
                if c > 1:
                    problems.append(f"{who}: {c} different inputs are named {n!r} (other data, or the same data "
                                    f"given another way); give them distinct names with as_input(input_name=...) "
                                    f"or as_named_input(...)")
            for b in bindings:
                made_by = producers.get(id(b.data), [])
                if not made_by:
                    problems.append(f"{who}: input {b.data.name!r} is produced by no step of the pipeline; "
                                    f"list it in outputs=[...] of the step that writes it")
                elif any(p is s for p in made_by):
                    problems.append(f"{who}: {b.data.name!r} is both an input and an output of the step")
            for a in s._run_after:
                if id(a) not in listed:
                    problems.append(f"{who}: run_after step {a.name!r} is not in the pipeline")
        for key, made_by in producers.items():
            if len(made_by) > 1:
                data = next(o for o in made_by[0].outputs if id(o) == key)
                names = " and ".join(repr(p.name) for p in made_by)
                problems.append(f"PipelineData {data.name!r} is written by steps {names}; each output "
                                f"must have exactly one producing step")
        cycle = _find_cycle(steps, producers)
        if cycle:
            problems.append("the steps form a cycle: " + " -> ".join(repr(n) for n in cycle))
        return problems

    # -- compiling -------------------------------------------------------------------------

    def _compile(self) -> tuple[GraphSpec, dict[str, dict[str, str]]]:
        backend = self.workspace._backend
        datastores = backend.list_datastores() if self.steps else []
        targets = backend.list_compute_targets() if self.steps else []
        folders = list(dict.fromkeys(s.source_directory for s in self.steps))
        # the agent snapshots the folders while the pipeline is checked and compiled here (a
        # pipeline with problems is told so without waiting for them)
        snapshots_of = backend.start_snapshots(folders) if self.steps else dict
        env_specs: dict[int, dict[str, Any]] = {}
        problems = self._problems(datastores, env_specs, targets)
        if problems:
            raise PipelineValidationError(problems)
        compiled = self._compiled_steps(datastores, env_specs)
        gits = git_properties_of(folders)
        snapshots = snapshots_of()
        specs, step_props = [], {}
        for s, fields in zip(self.steps, compiled, strict=True):
            snapshot = snapshots[s.source_directory]
            specs.append(StepSpec(snapshot=snapshot, **fields))
            step_props[s.name] = {**gits[s.source_directory], "cairn.snapshot": snapshot}
            for d in specs[-1].dataset_inputs:  # lineage: what data the step consumed
                step_props[s.name][f"cairn.input.{d.name}.digest"] = d.content_digest
                if d.dataset:
                    step_props[s.name][f"cairn.input.{d.name}.dataset"] = d.dataset
        return GraphSpec(tuple(specs)), step_props

    def _compiled_steps(self, datastores: list[dict[str, Any]],
                        env_specs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Each step's StepSpec fields but its snapshot (which the agent is taking meanwhile)."""
        default_store = self.default_datastore
        default_store_name = (default_store if isinstance(default_store, str) else getattr(default_store, "name", None)) \
            or next((d["name"] for d in datastores if d["is_default"]), None) \
            or self.workspace.get_default_datastore().name  # none is the default: it says so
        producer_of: dict[int, PythonScriptStep] = {id(o): s for s in self.steps for o in s.outputs}
        env_digests: dict[int, str] = {}
        compiled = []
        for s in self.steps:
            bindings = s.input_bindings()
            inputs = tuple(InputSpec(b.input_name, producer_of[id(b.data)].name, b.data.output_name, b.mode,
                                     b.path_on_compute, b.read_as) for b in bindings)
            binding_name: dict[int, str] = {}
            for b in bindings:
                binding_name.setdefault(id(b.data), b.input_name)
            args = []
            for a in s.arguments:
                if isinstance(a, PipelineData):
                    if any(a is o for o in s.outputs):
                        args.append(Argument(output=a.output_name))
                    else:
                        args.append(Argument(input=binding_name[id(a)]))
                elif isinstance(a, PipelineDataInput):
                    args.append(Argument(input=a.input_name))
                elif isinstance(a, DatasetConsumptionConfig):
                    args.append(Argument(input=a.name))
                else:
                    args.append(Argument(literal=str(a) if not isinstance(a, bool) else str(a)))
            env_spec = env_specs.get(id(s.runconfig.environment)) or s.runconfig.environment.to_spec()
            env_digest = env_digests.get(id(env_spec))
            if env_digest is None:
                env_digest = env_digests[id(env_spec)] = spec_digest(env_spec)
            rc = s.runconfig
            compiled.append(dict(
                name=s.name, script_name=s.script_name, source_directory=s.source_directory,
                arguments=tuple(args), inputs=inputs,
                outputs=tuple(_output_spec(o, default_store_name) for o in s.outputs),
                params=tuple(sorted((k, str(v)) for k, v in s.params.items())),
                environment=env_spec, environment_digest=env_digest,
                environment_variables=tuple(sorted((str(k), str(v)) for k, v in rc.environment_variables.items())),
                compute_target=_target_name(s), allow_reuse=s.allow_reuse, version=s.version,
                run_after=tuple(a.name for a in s._run_after),
                max_run_duration_seconds=rc.max_run_duration_seconds,
                cpus=rc.cpus, gpus=rc.gpus, memory_gb=rc.memory_gb, node_count=rc.node_count,
                dataset_inputs=tuple(_dataset_input(d, self.workspace) for d in s.dataset_bindings()),
            ))
        return compiled

    def __repr__(self) -> str:
        return f"Pipeline(steps={[s.name for s in self.steps]!r})"


def _output_spec(o: PipelineData, default_store: str) -> OutputSpec:
    destination = getattr(o, "destination_path", None)
    registration = getattr(o, "registration", None)
    return OutputSpec(o.output_name, o.datastore_name or default_store, destination,
                      bool(getattr(o, "upload_overwrite", False)), registration)


def _dataset_input(d: DatasetConsumptionConfig, workspace: Workspace) -> DatasetInputSpec:
    """Resolve the dataset now: its listing digest is what the step's fingerprint will see."""
    dataset = d.dataset
    dataset._workspace = dataset._workspace or workspace
    registered = f"{dataset.name}:{dataset.version}" if dataset.name else None
    digest = dataset.content_digest
    if not dataset._resolve():  # no file: an empty folder is a dataset, a path that is gone a mistake
        from cairn.data.datasets import missing_paths

        gone = missing_paths(dataset.definition, dataset._locate)
        if gone:
            what = f"dataset {registered!r}" if registered else "its dataset"
            raise PathNotFoundError(
                f"input {d.name!r}: {what} names {', '.join(gone)}, which does not exist now (deleted or moved "
                f"since the dataset was made?); the step would read nothing. Put the files back, or give the "
                f"input a dataset over where they are now")
    recorded = (dataset._registration or {}).get("content_digest")
    if registered and recorded and recorded != digest:
        # a version names files in a datastore, not a copy of them: lineage must not claim the old ones
        import sys

        print(f"note: the files of dataset {dataset.name!r} version {dataset.version} changed since it was "
              f"registered; input {d.name!r} reads them as they are now (register a new version to record "
              f"them)", file=sys.stderr)
        registered += " (its files changed since it was registered)"
    return DatasetInputSpec(name=d.name, kind=dataset.kind, definition=dataset.definition,
                            content_digest=digest, mode=d.mode,
                            path_on_compute=d.path_on_compute, dataset=registered)


def _target_name(step: PythonScriptStep) -> str:
    t = step.compute_target if step.compute_target is not None else step.runconfig.target
    if t is None:
        return "local"
    return t if isinstance(t, str) else t.name


def _with_producers(listed: list[PythonScriptStep]) -> list[PythonScriptStep]:
    """The listed steps plus, transitively, the producers of their inputs and run_after steps."""
    steps = list(listed)
    present = {id(x) for x in steps}
    i = 0
    while i < len(steps):
        s = steps[i]
        needed = [p for b in s.input_bindings() for p in getattr(b.data, "_producers", [])]
        needed += s._run_after
        for p in needed:
            if id(p) not in present:
                present.add(id(p))
                steps.append(p)
        i += 1
    return steps


def _upstream_first(steps: list[PythonScriptStep]) -> list[PythonScriptStep]:
    """A stable topological order (listing order where the graph allows); cycles keep listing order
    so that validate() can report them."""
    producers: dict[int, list[PythonScriptStep]] = {}
    for s in steps:
        for o in s.outputs:
            producers.setdefault(id(o), []).append(s)
    ordered: list[PythonScriptStep] = []
    placed: set[int] = set()
    visiting: set[int] = set()

    def place(s: PythonScriptStep) -> None:
        if id(s) in placed or id(s) in visiting:
            return
        visiting.add(id(s))
        for b in s.input_bindings():
            for p in producers.get(id(b.data), []):
                place(p)
        for a in s._run_after:
            place(a)
        visiting.discard(id(s))
        placed.add(id(s))
        ordered.append(s)

    for s in steps:
        place(s)
    return ordered


def _find_cycle(steps: list[PythonScriptStep], producers: dict[int, list[PythonScriptStep]]) -> list[str] | None:
    upstream: dict[int, list[PythonScriptStep]] = {}
    for s in steps:
        ups = [p for b in s.input_bindings() for p in producers.get(id(b.data), []) if p is not s]
        upstream[id(s)] = ups + [a for a in s._run_after]
    state: dict[int, int] = {}
    path: list[PythonScriptStep] = []

    def visit(s: PythonScriptStep) -> list[str] | None:
        state[id(s)] = 1
        path.append(s)
        for u in upstream.get(id(s), []):
            if state.get(id(u)) == 1:
                start = next(i for i, x in enumerate(path) if x is u)
                return [x.name for x in reversed(path[start:])] + [path[-1].name]
            if state.get(id(u)) is None:
                found = visit(u)
                if found:
                    return found
        path.pop()
        state[id(s)] = 2
        return None

    for s in steps:
        if state.get(id(s)) is None:
            found = visit(s)
            if found:
                return found
    return None

"""The graph spec: what authoring compiles to and the only thing the engine ever sees.

Plain frozen data with one canonical JSON form. A published pipeline will be a stored spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

SPEC_VERSION = 1
PYTHON_SCRIPT_STEP = "PythonScriptStep@1"


@dataclass(frozen=True)
class InputSpec:
    """An input of a step: an output of another step of the same pipeline."""

    name: str
    producer: str  # step name
    output: str  # output name on the producer
    mode: str = "mount"  # mount | download | direct
    path_on_compute: str | None = None
    read_as: dict[str, Any] | None = field(default=None, hash=False)  # a tabular reading of the output

    def __post_init__(self) -> None:
        if self.read_as:  # as its JSON has it (int keys become strings): the spec equals its JSON's
            object.__setattr__(self, "read_as", json.loads(json.dumps(self.read_as)))


@dataclass(frozen=True)
class DatasetInputSpec:
    """An input of a step read from a dataset. Its content digest (from the store's listing at
    submit) is the input's part of the fingerprint: new data in the same path means a new digest."""

    name: str
    kind: str  # file | tabular
    definition: dict[str, Any] = field(hash=False, compare=True)
    content_digest: str = ""
    mode: str = "direct"  # direct | mount | download
    path_on_compute: str | None = None
    dataset: str | None = None  # "name:version" when registered


@dataclass(frozen=True)
class OutputSpec:
    """An output a step writes; ``datastore`` names where it is committed.

    ``destination`` is a path template in that datastore ({run-id}, {output-name}); by default the
    run's own folder. ``register`` asks for a dataset version when the step completes."""

    name: str
    datastore: str
    destination: str | None = None
    overwrite: bool = False
    register: dict[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Argument:
    """One command-line argument: a literal, or a reference resolved to a path at run time."""

    literal: str | None = None
    input: str | None = None
    output: str | None = None

    def template(self) -> str:
        """The form used in fingerprints and explanations: paths are never part of it."""
        if self.input is not None:
            return f"{{input:{self.input}}}"
        if self.output is not None:
            return f"{{output:{self.output}}}"
        return self.literal or ""


@dataclass(frozen=True)
class StepSpec:
    name: str
    script_name: str
    source_directory: str
    snapshot: str
    kind: str = PYTHON_SCRIPT_STEP
    arguments: tuple[Argument, ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    environment: dict[str, Any] = field(default_factory=dict, hash=False)
    environment_digest: str = ""
    environment_variables: tuple[tuple[str, str], ...] = ()
    compute_target: str = "local"
    allow_reuse: bool = True
    version: str | None = None
    run_after: tuple[str, ...] = ()
    max_run_duration_seconds: float | None = None
    dataset_inputs: tuple[DatasetInputSpec, ...] = ()
    # what the step asks of a target that schedules by resources (Ray); not part of its fingerprint
    cpus: float | None = None
    gpus: float | None = None
    memory_gb: float | None = None
    node_count: int = 1  # > 1: nodes reserved for the step on a Ray target (its process runs on the first)

    def upstream(self) -> set[str]:
        """Names of the steps that must finish before this one starts."""
        return {i.producer for i in self.inputs} | set(self.run_after)

    def argument_template(self) -> list[str]:
        return [a.template() for a in self.arguments]


@dataclass(frozen=True)
class GraphSpec:
    steps: tuple[StepSpec, ...]
    version: int = SPEC_VERSION

    def step(self, name: str) -> StepSpec:
        by_name = self.__dict__.get("_by_name")
        if by_name is None:  # built once: the engine looks steps up by name for every input
            by_name = {s.name: s for s in self.steps}
            object.__setattr__(self, "_by_name", by_name)
        return by_name[name]

    def downstream(self, name: str) -> list[str]:
        """Every step that depends on ``name``, directly or not, in spec order."""
        found: set[str] = set()
        frontier = {name}
        while frontier:
            nxt = {s.name for s in self.steps if s.upstream() & frontier and s.name not in found}
            found |= nxt
            frontier = nxt
        return [s.name for s in self.steps if s.name in found]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)  # what dataclasses.asdict gives, without its deep copies (~4x faster)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        if data.get("version") != SPEC_VERSION:
            raise ValueError(f"graph spec version {data.get('version')!r} is not supported "
                             f"(this Cairn reads version {SPEC_VERSION})")
        return cls(steps=tuple(step_from_dict(s) for s in data["steps"]), version=SPEC_VERSION)

    @classmethod
    def from_json(cls, text: str) -> GraphSpec:
        return cls.from_dict(json.loads(text))


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in value)


def step_from_dict(d: dict[str, Any]) -> StepSpec:
    return StepSpec(
        name=d["name"],
        script_name=d["script_name"],
        source_directory=d["source_directory"],
        snapshot=d["snapshot"],
        kind=d.get("kind", PYTHON_SCRIPT_STEP),
        arguments=tuple(_argument(a) for a in d.get("arguments", ())),
        inputs=tuple(InputSpec(**i) for i in d.get("inputs", ())),
        outputs=tuple(OutputSpec(**o) for o in d.get("outputs", ())),
        params=_pairs(d.get("params", ())),
        environment=dict(d.get("environment", {})),
        environment_digest=d.get("environment_digest", ""),
        environment_variables=_pairs(d.get("environment_variables", ())),
        compute_target=d.get("compute_target", "local"),
        allow_reuse=bool(d.get("allow_reuse", True)),
        version=d.get("version"),
        run_after=tuple(d.get("run_after", ())),
        max_run_duration_seconds=d.get("max_run_duration_seconds"),
        cpus=d.get("cpus"), gpus=d.get("gpus"), memory_gb=d.get("memory_gb"), node_count=int(d.get("node_count", 1)),
        dataset_inputs=tuple(DatasetInputSpec(**x) for x in d.get("dataset_inputs", ())),
    )


_ARGUMENTS: dict[tuple[Any, ...], Argument] = {}  # Arguments are immutable: equal ones are shared


def _argument(a: dict[str, Any]) -> Argument:
    """The Argument ``a`` describes, made once for each distinct one (a spec repeats most: "--in" is
    every input's; building each cost a third of reading a fan-out's spec)."""
    key = tuple(sorted(a.items()))
    try:
        found = _ARGUMENTS.get(key)
    except TypeError:  # a value that is not hashable: no Argument of Cairn's has one, Argument says what is wrong
        return Argument(**a)
    if found is None:
        if len(_ARGUMENTS) >= 65536:  # (an agent reads spec after spec: the cache must not grow without end)
            _ARGUMENTS.clear()
        found = _ARGUMENTS[key] = Argument(**a)
    return found


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_LEAVES = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """``value`` as plain dicts, lists and scalars (tuples become lists, as in JSON). Most values are
    scalars: they are returned where they are met, without a call each (a 500-step spec has ~40,000)."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is tuple or kind is list:
        return [v if type(v) in _LEAVES else _plain(v) for v in value]
    if kind is dict:
        return {k: v if type(v) in _LEAVES else _plain(v) for k, v in value.items()}
    names = _FIELD_NAMES.get(kind)
    if names is None:
        if isinstance(value, (str, int, float, bool)):  # a subclass (an enum of str, a bool-like int)
            return value
        if isinstance(value, (tuple, list)):
            return [_plain(v) for v in value]
        if isinstance(value, dict):
            return {k: _plain(v) for k, v in value.items()}
        if not is_dataclass(value) or isinstance(value, type):
            raise TypeError(f"cannot record a value of type {kind.__name__} in a graph spec: {value!r}")
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields(value))
    return {name: v if type(v := getattr(value, name)) in _LEAVES else _plain(v) for name in names}

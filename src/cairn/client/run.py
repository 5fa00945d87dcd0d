"""Runs: PipelineRun, StepRun, and the live or offline run a script gets from Run.get_context()."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.client.follow import follow
from cairn.core.errors import NotFoundError, PathNotFoundError, UserInputError
from cairn.core.names import check_type
from cairn.core.status import Status
from cairn.runner.job import digest_status
from cairn.runner.markers import FAIL_MARKER

if TYPE_CHECKING:
    from cairn.client.experiment import Experiment
    from cairn.client.workspace import Workspace


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


def aggregate_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Azure ML's shape: a scalar logged once is a value, logged again a list; rows make tables."""
    out: dict[str, Any] = {}
    for r in rows:
        name, kind, value = r["name"], r["kind"], r["value"]
        if kind == "scalar":
            if name in out:
                out[name] = out[name] + [value] if isinstance(out[name], list) else [out[name], value]
            else:
                out[name] = value
        elif kind == "row":
            table = out.setdefault(name, {})
            for col, v in value.items():
                table.setdefault(col, []).append(v)
        else:  # list, table, image: the latest wins
            out[name] = value
    return out


class _MetricsMixin(ABC):
    """log_* methods shared by live and offline runs; ``_record`` says where they go."""

    @abstractmethod
    def _record(self, name: str, kind: str, value: Any) -> None: ...

    @staticmethod
    def _check_name(name: Any) -> str:
        check_type(name, str, "metric name")
        if not name.strip():
            raise UserInputError("metric name must not be empty")
        return name

    @staticmethod
    def _jsonable(value: Any, what: str) -> Any:
        if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
            value = value.item()  # numpy scalars
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{what} must be a number, string, bool or a list/dict of them, "
                                 f"not {type(value).__name__}") from None
        return value

    def log(self, name: str, value: Any, description: str = "", step: int | None = None) -> None:
        self._record(self._check_name(name), "scalar", self._jsonable(value, f"metric {name!r}"))

    def log_list(self, name: str, value: list[Any], description: str = "") -> None:
        if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
            raise UserInputError(f"log_list {name!r} expects a list, not {type(value).__name__}")
        value = value.tolist() if hasattr(value, "tolist") else list(value)
        self._record(self._check_name(name), "list", self._jsonable(value, f"metric {name!r}"))

    def log_row(self, name: str, description: str | None = None, **kwargs: Any) -> None:
        self._record(self._check_name(name), "row", self._jsonable(kwargs, f"row {name!r}"))

    def log_table(self, name: str, value: dict[str, list[Any]], description: str = "") -> None:
        if not isinstance(value, dict):
            raise UserInputError(f"log_table {name!r} expects a dict of column -> list, not {type(value).__name__}")
        self._record(self._check_name(name), "table", self._jsonable(value, f"table {name!r}"))

    def log_image(self, name: str, path: str | os.PathLike[str] | None = None, plot: Any = None,
                  description: str = "") -> None:
        self._check_name(name)
        if (path is None) == (plot is None):
            raise UserInputError("log_image needs exactly one of path= (an image file) or plot= (a matplotlib figure)")
        tmp = None
        if plot is not None:
            tmp = tempfile.NamedTemporaryFile(suffix=".png", delete=False)
            tmp.close()
            plot.savefig(tmp.name)
            path = tmp.name
        assert path is not None
        if not Path(path).is_file():
            raise PathNotFoundError(f"log_image {name!r}: image file {str(path)!r} does not exist")
        try:
            stored = self._store_image(name, str(path))
        finally:
            if tmp is not None:
                os.unlink(tmp.name)
        self._record(name, "image", stored)

    def _store_image(self, name: str, path: str) -> str:
        return path


class Run(_MetricsMixin):
    """A run recorded in a workspace (a pipeline run or a step run)."""

    def __init__(self, experiment: Experiment, run_id: str) -> None:
        self.experiment = experiment
        self.id = run_id
        self._backend = experiment.workspace._backend
        self._pipeline_run = False  # known to be a pipeline run (one just submitted): not read to find out

    @classmethod
    def _from_record(cls, workspace: Workspace, record: dict[str, Any]) -> Run:
        from cairn.client.experiment import Experiment

        exp = Experiment(workspace, record["experiment"])
        if record["kind"] != "pipeline":
            return StepRun(exp, record["id"])
        run = PipelineRun(exp, record["id"])
        run._pipeline_run = True
        return run

    @staticmethod
    def get_context(allow_offline: bool = True) -> Run:
        """The live run of the step this script runs in; outside a pipeline an offline run."""
        run_id = os.environ.get("CAIRN_RUN_ID")
        workspace = os.environ.get("CAIRN_WORKSPACE")
        if run_id and workspace:
            try:
                from cairn.backend.relay import RelayBackend
                from cairn.backend.through_agent import workspace_backend
                from cairn.client.experiment import Experiment
                from cairn.client.workspace import Workspace

                relay = os.environ.get("CAIRN_RELAY")  # a Ray node of another machine: through its runner
                # on this machine: through the agent that runs the step (or the workspace opened here)
                ws = Workspace._over(RelayBackend(relay) if relay else workspace_backend(workspace))
                return StepRun(Experiment(ws, os.environ["CAIRN_EXPERIMENT"]), run_id)
            except (ImportError, TypeError, AttributeError) as exc:
                from cairn.backend import client_conflict

                explained = client_conflict(exc)
                if explained is exc:
                    raise
                raise explained from None
        if not allow_offline and not os.environ.get("CAIRN_DEBUG_OF"):  # a recreated step is offline
            raise NotFoundError("not running inside a Cairn step (no CAIRN_RUN_ID); pass allow_offline=True "
                                "to get an offline run")
        return OfflineRun()

    # -- record --------------------------------------------------------------------------

    def _row(self) -> dict[str, Any]:
        row = self._backend.get_run(self.id)
        if row is None:
            raise NotFoundError(f"run {self.id!r} no longer exists")
        return row

    @property
    def workspace(self) -> Workspace:
        return self.experiment.workspace

    @property
    def name(self) -> str:
        return self._row()["name"]

    @property
    def status(self) -> str:
        return self._row()["status"]

    def get_status(self) -> str:
        return self.status

    @property
    def parent(self) -> Run | None:
        parent_id = self._row()["parent_id"]
        return PipelineRun(self.experiment, parent_id) if parent_id else None

    def get_details(self) -> dict[str, Any]:
        row = self._row()
        return {
            "runId": self.id, "name": row["name"], "experiment": row["experiment"], "status": row["status"],
            "statusReason": row["status_reason"], "startTimeUtc": _iso(row["started_at"]),
            "endTimeUtc": _iso(row["ended_at"]), "createdTimeUtc": _iso(row["created_at"]),
            "properties": self.get_properties(), "tags": self.get_tags(), "parentRunId": row["parent_id"],
            "events": [{"status": e["status"], "reason": e["reason"], "time": _iso(e["at"])}
                       for e in self._backend.get_events(self.id)],
        }

    def get_tags(self) -> dict[str, Any]:
        return self._merged("tags")

    def get_properties(self) -> dict[str, Any]:
        return self._merged("properties")

    def _merged(self, which: str) -> dict[str, Any]:
        """A reused step shows what the run it reused recorded, then its own."""
        get = self._backend.get_tags if which == "tags" else self._backend.get_properties
        source = self._row().get("reused_from")
        return {**(get(source) if source else {}), **get(self.id)}

    @property
    def tags(self) -> dict[str, Any]:
        return self.get_tags()

    @property
    def properties(self) -> dict[str, Any]:
        return self.get_properties()

    def tag(self, key: str, value: Any = None) -> None:
        check_type(key, str, "tag key")
        self._backend.set_tags(self.id, {key: "" if value is None else value})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not isinstance(tags, dict):
            raise UserInputError(f"set_tags expects a dict, not {type(tags).__name__}")
        self._backend.set_tags(self.id, {str(k): "" if v is None else v for k, v in tags.items()})

    def add_properties(self, properties: dict[str, Any]) -> None:
        if not isinstance(properties, dict):
            raise UserInputError(f"add_properties expects a dict, not {type(properties).__name__}")
        clashes = self._backend.add_properties(self.id, {str(k): v for k, v in properties.items()})
        if clashes:
            raise UserInputError(f"properties are immutable once set; already set with another value: "
                                 f"{', '.join(clashes)} (use tags for values that change)")

    def _record(self, name: str, kind: str, value: Any) -> None:
        from cairn.client.metric_batcher import batcher_for

        batcher_for(self._backend, self.id).add(name, kind, value)

    def _store_image(self, name: str, path: str) -> str:
        return self._backend.put_artifact(self.id, f"images/{Path(name).name}{Path(path).suffix or '.png'}", path)

    def get_metrics(self, name: str | None = None, recursive: bool = False) -> dict[str, Any]:
        """Metrics by name; with ``recursive``, by run id for this run and its step runs.
        A reused step shows the metrics of the step run whose outputs it reused."""
        from cairn.client.metric_batcher import flush_all

        flush_all()  # what this process logged is visible to what it reads
        rows_of = [self._row()]
        if recursive:
            rows_of += self._backend.get_children(self.id)
        source = {r["id"]: r.get("reused_from") or r["id"] for r in rows_of}
        rows = self._backend.get_metric_rows(sorted(set(source.values())))
        result = {}
        for rid, src in source.items():
            m = aggregate_metrics([r for r in rows if r["run_id"] == src])
            result[rid] = {k: v for k, v in m.items() if name is None or k == name}
        return result if recursive else result[self.id]

    def cancel(self) -> None:
        """Cancel the run (for a step run: its pipeline run). Steps running now are killed."""
        self._backend.cancel_run(self.id)

    def wait_for_completion(self, show_output: bool = True, timeout_seconds: float | None = None,
                            raise_on_error: bool = True) -> str:
        """Wait for the run to end; returns its final status (as Azure ML's PipelineRun does)."""
        pipeline_id = self.id if self._pipeline_run else self._row()["parent_id"] or self.id
        status = follow(self._backend, pipeline_id, show_output=show_output, timeout_seconds=timeout_seconds,
                        raise_on_error=raise_on_error, only_step=None if pipeline_id == self.id else self.id)
        return status if pipeline_id == self.id else self.get_status()  # (a step's, not its pipeline's)

    # -- Azure ML run methods scripts call ---------------------------------------------------

    @property
    def display_name(self) -> str:
        return self.name

    def flush(self) -> None:
        """Write metrics logged so far (they are batched)."""
        from cairn.client.metric_batcher import flush_all

        flush_all()

    def complete(self) -> None:
        """Kept for scripts written for Azure ML: a step's status comes from its exit code, so this
        only writes pending metrics."""
        self.flush()

    def fail(self, error_details: Any = None, error_code: str | None = None) -> None:
        """Mark the step failed even if it exits 0 (its outputs are then not committed)."""
        self.flush()
        log_dir = os.environ.get("CAIRN_LOG_DIR")
        if os.environ.get("CAIRN_RUN_ID") != self.id or not log_dir:
            raise UserInputError("fail() marks the run of the step it is called in; call it inside that step")
        Path(log_dir, FAIL_MARKER).write_text(str(error_details or "the step called run.fail()"))

    def upload_file(self, name: str, path_or_stream: Any) -> str:
        """Keep a file with the run (its ``artifacts/``); returns where it is stored."""
        check_type(name, str, "artifact name")
        if hasattr(path_or_stream, "read"):
            with tempfile.NamedTemporaryFile(delete=False) as tmp:
                data = path_or_stream.read()
                tmp.write(data.encode() if isinstance(data, str) else data)
            try:
                return self._backend.put_artifact(self.id, name, tmp.name)
            finally:
                os.unlink(tmp.name)
        if not Path(path_or_stream).is_file():
            raise PathNotFoundError(f"upload_file {name!r}: {str(path_or_stream)!r} is not a file")
        return self._backend.put_artifact(self.id, name, str(path_or_stream))

    def upload_files(self, names: list[str], paths: list[str | os.PathLike[str]]) -> list[str]:
        """``upload_file`` for each (name, path) pair: all checked first, so none is kept when one is missing."""
        pairs = _upload_pairs(names, paths)
        return [self.upload_file(name, path) for name, path in pairs]

    def upload_folder(self, name: str, path: str | os.PathLike[str]) -> list[str]:
        """Keep every file under the folder ``path`` as ``name/<its path in the folder>``."""
        return [self.upload_file(n, p) for n, p in _folder_files(name, path)]

    def get_file_names(self) -> list[str]:
        return self._backend.list_artifacts(self.id)

    def download_file(self, name: str, output_file_path: str | os.PathLike[str] | None = None) -> str:
        source = self._backend.artifact_path(self.id, name)
        if not source.is_file():
            raise FileNotFoundError(f"run {self.id} has no file {name!r}; it has: {self.get_file_names()}")
        dest = _download_destination(name, output_file_path)
        shutil.copyfile(source, dest)
        return str(dest)

    def get_children(self) -> list[Run]:
        return [Run._from_record(self.workspace, r) for r in self._backend.get_children(self.id)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, experiment={self.experiment.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


class PipelineRun(Run):
    def get_steps(self) -> list[StepRun]:
        return [StepRun(self.experiment, c["id"]) for c in self._backend.get_children(self.id)]

    def find_step_run(self, name: str) -> list[StepRun]:
        check_type(name, str, "step name")
        return [StepRun(self.experiment, c["id"]) for c in self._backend.get_children(self.id) if c["name"] == name]

    def get_graph_spec(self) -> dict[str, Any]:
        return json.loads(self._row()["spec"])


class OutputData:
    """A committed output of a step run."""

    def __init__(self, record: dict[str, Any], backend: Any = None) -> None:
        self.name: str = record["name"]
        self.datastore_name: str = record["datastore"]
        self.path_on_datastore: str = record["path"]
        # "made", or why there is no digest (yet): "pending" (committed before it was digested; its
        # agent makes it after the step's end) or "changed" (changed after its commit, before then)
        self.digest_status: str = digest_status(record["digest"])
        # the content digest (``<algorithm>:<hex>``); None while pending, or when it changed
        self.digest: str | None = record["digest"] if self.digest_status == "made" else None
        self.size: int = record["size"]
        # None when the output lives in an object store (download() fetches it)
        self.local_path: Path | None = Path(record["local_path"]) if record.get("local_path") else None
        self._record = record
        self._backend = backend

    def download(self, local_path: str | os.PathLike[str], overwrite: bool = False,
                 show_progress: bool = False) -> str:
        """Copy the output into ``local_path/<output name>`` (writable copies); files that exist
        there are kept unless ``overwrite``. Returns that path."""
        dest = Path(local_path) / self.name
        if self.local_path is None:
            copied, skipped = self._backend.fetch_output(self._record, dest, overwrite)
            if show_progress:
                print(f"downloaded {self.name}: {copied} file(s) to {dest}" + (f", {skipped} kept" if skipped else ""))
            return str(dest)
        copied = skipped = 0
        sources = [self.local_path] if self.local_path.is_file() else \
            sorted(p for p in self.local_path.rglob("*") if p.is_file())
        for src in sources:
            target = dest if src == self.local_path else dest / src.relative_to(self.local_path)
            if target.exists() and not overwrite:
                skipped += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()
            shutil.copyfile(src, target)
            copied += 1
        dest.mkdir(parents=True, exist_ok=True) if self.local_path.is_dir() else None
        if show_progress:
            print(f"downloaded {self.name}: {copied} file(s) to {dest}" + (f", {skipped} kept" if skipped else ""))
        return str(dest)

    def __repr__(self) -> str:
        return f"OutputData(name={self.name!r}, datastore={self.datastore_name!r}, path={self.path_on_datastore!r})"


class StepRun(Run):
    @property
    def reused_from(self) -> str | None:
        """The step run whose outputs this one reused (None when it ran)."""
        return self._row()["reused_from"]

    @property
    def is_reused(self) -> bool:
        return self.status == Status.REUSED.value

    def _log_source(self) -> str:
        return self.reused_from or self.id  # a reused step shows the logs of the run it reused

    def get_stdout_log(self) -> str:
        return self._backend.read_log(self._log_source(), "stdout", 0, complete=True)[0]

    def get_stderr_log(self) -> str:
        return self._backend.read_log(self._log_source(), "stderr", 0, complete=True)[0]

    def get_environment_log(self) -> str:
        """What building (or finding) the step's environment printed; empty for the default one."""
        return self._backend.read_log(self.id, "environment", 0, complete=True)[0]

    def get_system_log(self) -> str:
        return self._backend.read_log(self.id, "system", 0, complete=True)[0]

    def get_outputs(self) -> dict[str, OutputData]:
        return {n: OutputData(r, self._backend) for n, r in self._backend.get_outputs(self.id).items()}

    def get_output_data(self, name: str) -> OutputData:
        check_type(name, str, "output name")
        outputs = self._backend.get_outputs(self.id)
        if name not in outputs:
            have = ", ".join(sorted(outputs)) or "none"
            raise NotFoundError(f"step run {self.id} has no committed output {name!r} (outputs: {have}; "
                                f"status {self.status})")
        return OutputData(outputs[name], self._backend)

    def get_fingerprint(self) -> dict[str, Any]:
        return {"fingerprint": self._row()["fingerprint"], "parts": json.loads(self._row()["fingerprint_parts"] or "null")}

    def explain(self) -> dict[str, Any]:
        """Why the step ran or was reused: its fingerprint parts and what differs from the last run."""
        return self._backend.explain(self.id)

    @property
    def input_datasets(self) -> dict[str, Any]:
        """Inside the step: input name -> its local path; a dataset input in direct mode -> the Dataset."""
        if os.environ.get("CAIRN_RUN_ID") != self.id:
            return {}
        return _step_inputs(lambda: self.workspace)

    @property
    def output_datasets(self) -> dict[str, Any]:
        if os.environ.get("CAIRN_RUN_ID") == self.id:
            return json.loads(os.environ.get("CAIRN_OUTPUTS", "{}"))
        return {}


def _step_inputs(workspace: Callable[[], Workspace | None]) -> dict[str, Any]:
    """Inside a step: input name -> its local path; a dataset input in direct mode -> the Dataset
    (of ``workspace()``, asked for only then)."""
    result: dict[str, Any] = json.loads(os.environ.get("CAIRN_INPUTS") or "{}")
    for name, d in json.loads(os.environ.get("CAIRN_DATASETS") or "{}").items():
        if d["mode"] == "direct":
            from cairn.client.dataset import FileDataset, TabularDataset

            cls = FileDataset if d["kind"] == "file" else TabularDataset
            result[name] = cls(d["definition"], workspace())
    return result


def _download_destination(name: str, output_file_path: str | os.PathLike[str] | None) -> Path:
    """Where ``download_file`` writes the run's file ``name``: the path given (into it, if a folder),
    else its base name in the current folder."""
    dest = Path(output_file_path or Path(name).name)
    return dest / Path(name).name if dest.is_dir() else dest


def _upload_pairs(names: list[str], paths: list[Any]) -> list[tuple[str, Any]]:
    if not isinstance(names, list | tuple) or not isinstance(paths, list | tuple) or len(names) != len(paths):
        raise UserInputError("upload_files expects two lists of the same length: names and paths")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise PathNotFoundError(f"upload_files: not a file: {', '.join(repr(m) for m in missing)}")
    return list(zip(names, paths, strict=True))


def _folder_files(name: str, path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    check_type(name, str, "artifact name")
    folder = Path(path)
    if not folder.is_dir():
        raise PathNotFoundError(f"upload_folder {name!r}: {str(path)!r} is not a folder")
    return [(f"{name.rstrip('/')}/{f.relative_to(folder).as_posix()}", str(f))
            for f in sorted(folder.rglob("*")) if f.is_file()]


class _OfflineExperiment:
    """An offline run's experiment. In a step recreated by `cairn debug`: the recorded step's
    experiment name and workspace (opened when first asked for), for the script to read. Else the
    workspace the current folder is in (``Workspace.from_config()``), or None outside any."""

    def __init__(self, name: str = "offline", workspace_path: str | None = None) -> None:
        self.name = name
        self._workspace_path = workspace_path
        self._workspace: Workspace | None = None
        self._looked = False

    @property
    def workspace(self) -> Workspace | None:
        if self._workspace is None and not self._looked:
            from cairn.client.workspace import Workspace
            from cairn.core.errors import WorkspaceNotFoundError

            self._looked = True
            try:
                self._workspace = Workspace(self._workspace_path) if self._workspace_path else Workspace.from_config()
            except WorkspaceNotFoundError:
                self._workspace = None
        return self._workspace


class OfflineRun(_MetricsMixin):
    """What ``Run.get_context()`` gives outside a pipeline: it prints what it would log. In a step
    recreated by `cairn debug`, it has the step's inputs, outputs, experiment and workspace (to
    read), and an offline parent: nothing it logs reaches the recorded runs."""

    def __init__(self, *, experiment: _OfflineExperiment | None = None) -> None:
        """``experiment``: given for the offline parent of a recreated step (it has no inputs)."""
        self.id = "OfflineRun"
        debugging = bool(os.environ.get("CAIRN_DEBUG_OF"))
        step = experiment is None
        self.experiment: Any = experiment or (_OfflineExperiment(
            os.environ.get("CAIRN_EXPERIMENT", "offline"), os.environ.get("CAIRN_DEBUG_WORKSPACE"))
            if debugging else _OfflineExperiment())
        self.parent = OfflineRun(experiment=self.experiment) if debugging and step else None
        # a step recreated by `cairn debug` still finds its inputs (direct datasets as the run had
        # them) and outputs here
        self.input_datasets: dict[str, Any] = (_step_inputs(lambda: self.experiment.workspace) if debugging else
                                               json.loads(os.environ.get("CAIRN_INPUTS") or "{}")) if step else {}
        self.output_datasets: dict[str, Any] = json.loads(os.environ.get("CAIRN_OUTPUTS") or "{}") if step else {}
        self._metrics: list[dict[str, Any]] = []
        self._tags: dict[str, Any] = {}
        self._properties: dict[str, Any] = {}
        self._files: dict[str, str | bytes] = {}  # uploaded name -> its path, or a stream's bytes

    def _record(self, name: str, kind: str, value: Any) -> None:
        print(f"[offline run] {kind} {name} = {value!r}", file=sys.stderr)
        self._metrics.append({"name": name, "kind": kind, "value": value})

    def log_image(self, name: str, path: str | os.PathLike[str] | None = None, plot: Any = None,
                  description: str = "") -> None:
        """Offline: say what would be logged; never fail a script that runs outside a pipeline."""
        if path is not None and not Path(path).is_file():
            print(f"[offline run] image {name}: {str(path)!r} does not exist (it would fail in a pipeline)",
                  file=sys.stderr)
            return
        super().log_image(name, path=path, plot=plot, description=description)

    def get_metrics(self, name: str | None = None, recursive: bool = False) -> dict[str, Any]:
        m = aggregate_metrics(self._metrics)
        return {k: v for k, v in m.items() if name is None or k == name}

    def tag(self, key: str, value: Any = None) -> None:
        print(f"[offline run] tag {key} = {value!r}", file=sys.stderr)
        self._tags[key] = value

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.tag(k, v)

    def get_tags(self) -> dict[str, Any]:
        return dict(self._tags)

    def add_properties(self, properties: dict[str, Any]) -> None:
        print(f"[offline run] properties {properties!r}", file=sys.stderr)
        self._properties.update(properties)

    def get_properties(self) -> dict[str, Any]:
        return dict(self._properties)

    @property
    def tags(self) -> dict[str, Any]:
        return self.get_tags()

    @property
    def properties(self) -> dict[str, Any]:
        return self.get_properties()

    @property
    def name(self) -> str:
        """The recreated step's name under `cairn debug`, else "OfflineRun"."""
        return os.environ.get("CAIRN_STEP_NAME", self.id) if self.parent is not None else self.id

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        return self.get_status()

    def get_status(self) -> str:
        return Status.RUNNING.value

    def get_details(self) -> dict[str, Any]:
        return {"runId": self.id, "name": self.name, "experiment": self.experiment.name, "status": self.status,
                "statusReason": None, "properties": self.get_properties(), "tags": self.get_tags(),
                "parentRunId": self.parent.id if self.parent is not None else None, "events": []}

    def flush(self) -> None:
        pass  # nothing is batched: each call printed at once

    def complete(self) -> None:
        pass

    def fail(self, error_details: Any = None, error_code: str | None = None) -> None:
        print(f"[offline run] fail: {error_details or 'the step called run.fail()'} (in a pipeline the step "
              f"would be Failed)", file=sys.stderr)

    def cancel(self) -> None:
        print("[offline run] cancel (in a pipeline the run would be canceled)", file=sys.stderr)

    def upload_file(self, name: str, path_or_stream: Any) -> str:
        """Offline: checked as in a pipeline, and remembered (``get_file_names``, ``download_file``)."""
        check_type(name, str, "artifact name")
        if hasattr(path_or_stream, "read"):
            data = path_or_stream.read()
            self._files[name] = data.encode() if isinstance(data, str) else data
            print(f"[offline run] upload {name} ({len(self._files[name])} bytes from a stream)", file=sys.stderr)
            return name
        if not Path(path_or_stream).is_file():
            raise PathNotFoundError(f"upload_file {name!r}: {str(path_or_stream)!r} is not a file")
        self._files[name] = str(path_or_stream)
        print(f"[offline run] upload {name} from {str(path_or_stream)!r}", file=sys.stderr)
        return name

    def upload_files(self, names: list[str], paths: list[str | os.PathLike[str]]) -> list[str]:
        return [self.upload_file(name, path) for name, path in _upload_pairs(names, paths)]

    def upload_folder(self, name: str, path: str | os.PathLike[str]) -> list[str]:
        return [self.upload_file(n, p) for n, p in _folder_files(name, path)]

    def get_file_names(self) -> list[str]:
        return sorted(self._files)

    def download_file(self, name: str, output_file_path: str | os.PathLike[str] | None = None) -> str:
        if name not in self._files:
            raise FileNotFoundError(f"the offline run has no file {name!r}; it has: {self.get_file_names()}")
        dest = _download_destination(name, output_file_path)
        kept = self._files[name]
        if isinstance(kept, bytes):
            dest.write_bytes(kept)
        else:
            shutil.copyfile(kept, dest)
        return str(dest)

    def get_children(self) -> list[Any]:
        return []

    def __repr__(self) -> str:
        return "OfflineRun()"

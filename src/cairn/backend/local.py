"""LocalBackend: the backend protocol over an embedded workspace (SQLite + local folders)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.backend.base import AgentSocketCalls
from cairn.core import ids
from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.spec import GraphSpec
from cairn.core.status import Status
from cairn.engine import client as agent_client
from cairn.engine.context import DEFAULT_DATASTORE, SEALED, local_datastore_roots, local_run_root, locate_datastore
from cairn.engine.fingerprint import differing_parts
from cairn.storage.datastores import DatastoreLocation
from cairn.storage.layout import WorkspaceLayout, run_dir
from cairn.storage.objects import ObjectStore
from cairn.storage.paths import real_path
from cairn.storage.secrets import SecretBox
from cairn.storage.snapshot import diff_manifests, load_manifest, snapshot_limits, take_snapshot
from cairn.store import queries as q
from cairn.store.db import Store

CONFIG_VERSION = 1



# what `explain` says of a step that completed without a fingerprint (engine/late_digests.py)
_UNKEYED = ("it completed before its fingerprint: an input of it was committed by its producer before being "
            "digested, and the fingerprint is recorded once that digest is made; where it could not be (the "
            "agent stopped first, or the input changed), the step is never reused: its next run runs it again")


class LocalBackend(AgentSocketCalls):
    def __init__(self, layout: WorkspaceLayout, store: Store | None = None) -> None:
        """``store``: the workspace's store already open in this process (the agent's: its answers to
        scripts share its connections and compiled statements), else it is opened here."""
        self.layout = layout
        self.location = str(layout.root)
        if store is None:
            store = Store.for_sqlite_file(layout.db)
            store.migrate()
        self.store = store
        self.objects = ObjectStore(layout.objects)
        self._config = layout.read_config()
        self._secrets = SecretBox(layout.dot / "secret.key")

    @classmethod
    def create(cls, root: str | os.PathLike[str], exist_ok: bool = True) -> LocalBackend:
        layout = WorkspaceLayout(root)
        if layout.config.exists() and not exist_ok:
            raise FileExistsError(f"a Cairn workspace already exists in {layout.root}")
        for d in layout.folders:
            d.mkdir(parents=True, exist_ok=True)
        if not layout.config.exists():
            layout.config.write_text(json.dumps(
                {"version": CONFIG_VERSION, "kind": "embedded", "name": layout.root.name}, indent=2) + "\n")
        backend = cls(layout)
        if not backend.list_datastores():
            (layout.datastores / DEFAULT_DATASTORE).mkdir(parents=True, exist_ok=True)
            backend.register_datastore(DEFAULT_DATASTORE, "local",
                                       {"path": f"datastores/{DEFAULT_DATASTORE}"}, True)
        if not backend.list_compute_targets():
            backend.put_compute_target("local", "local", {})
        return backend

    @property
    def name(self) -> str:
        return self.layout.workspace_name(self._config)

    # -- workspace objects -----------------------------------------------------------------

    def list_datastores(self) -> list[dict[str, Any]]:
        """Registered datastores; their credentials never leave this module (only ``has_secrets``)."""
        rows = q.list_named(self.store, "datastores")
        for r in rows:
            sealed = r["config"].pop(SEALED, None)
            r["has_secrets"] = bool(sealed)
        return rows

    def register_datastore(self, name: str, kind: str, config: dict[str, Any], default: bool,
                           secrets: dict[str, Any] | None = None) -> None:
        stored = dict(config)
        if secrets:
            stored[SEALED] = self._secrets.seal(secrets)
        q.put_named(self.store, "datastores", name, kind, stored, is_default=default)

    def make_default_datastore(self, name: str) -> None:
        q.set_default_datastore(self.store, name)

    def unregister_datastore(self, name: str) -> None:
        q.delete_named(self.store, "datastores", name)

    def datastore_location(self, name: str) -> DatastoreLocation:
        return locate_datastore(self.store, self.layout, name)

    def datastore_root(self, name: str) -> str:
        loc = self.datastore_location(name)
        if loc.kind != "local":
            raise UserInputError(f"datastore {name!r} is a {loc.kind} datastore: it has no local folder")
        return loc.config["path"]

    def list_compute_targets(self) -> list[dict[str, Any]]:
        return q.list_named(self.store, "compute_targets")

    def put_compute_target(self, name: str, kind: str, config: dict[str, Any]) -> None:
        q.put_named(self.store, "compute_targets", name, kind, config)

    def delete_compute_target(self, name: str) -> None:
        """Forget a target; the Ray nodes Cairn started for it are stopped first."""
        record = next((c for c in self.list_compute_targets() if c["name"] == name), None)
        if record is not None and record["kind"] == "ray" and record["config"].get("managed"):
            from cairn.compute.ray_cluster import stop_node

            for node in reversed(record["config"].get("nodes") or []):
                stop_node(node)
        q.delete_named(self.store, "compute_targets", name)

    def provision_ray_cluster(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Start a Ray head and ``min_nodes - 1`` worker nodes here; returns the target's config."""
        from cairn.compute.ray_cluster import start_node

        logs = self.layout.dot / "ray" / name
        cpus, gpus = config.get("cpus_per_node"), config.get("gpus_per_node")
        head = start_node(None, cpus, logs / "head.log", gpus=gpus)
        nodes = [head] + [start_node(head["address"], cpus, logs / f"worker-{i + 1}.log", gpus=gpus)
                          for i in range(max(0, config.get("min_nodes", 0) - 1))]
        return {**config, "address": head["address"], "nodes": nodes}

    def wait_for_ray_cluster(self, config: dict[str, Any], timeout: float, show: Any) -> list[dict[str, Any]]:
        from cairn.compute.ray_cluster import wait_ready

        return wait_ready(config["address"], len(config.get("nodes") or []) or 1, timeout, show)

    def ray_cluster_nodes(self, address: str) -> list[dict[str, Any]]:
        from cairn.compute.ray_cluster import cluster_nodes

        return cluster_nodes(address)

    def build_environment(self, spec: dict[str, Any], name: str, log: Any) -> tuple[str, bool]:
        """Build (or find) the environment in this workspace's cache: (its folder, built now)."""
        from cairn.environments.build import EnvironmentCache

        resolved = EnvironmentCache(self.layout.envs).resolve(spec, name, log)
        resolved.close()
        return str(resolved.folder), resolved.built_now

    def built_environments(self) -> list[dict[str, Any]]:
        from cairn.environments.build import EnvironmentCache

        return EnvironmentCache(self.layout.envs).entries()

    def prune_environments(self, dry_run: bool = False) -> tuple[list[str], list[str]]:
        """Remove built environments no unfinished run needs: (removed keys, keys a step is using)."""
        from cairn.environments.build import EnvironmentCache

        return EnvironmentCache(self.layout.envs).prune(self.environments_in_use(), dry_run=dry_run)

    def running_steps_on(self, target: str) -> list[dict[str, Any]]:
        """Steps of unfinished runs that run on ``target`` now: step run id, name, pipeline run."""
        running = []
        for run in q.unfinished_pipeline_runs(self.store):
            spec = json.loads(run["spec"]) if run.get("spec") else {"steps": []}
            on_target = {s["name"] for s in spec["steps"] if (s.get("compute_target") or "local") == target}
            for child in q.child_runs(self.store, run["id"]):
                if child["name"] in on_target and child["status"] in ("Preparing", "Running", "Finalizing"):
                    running.append({"step_run_id": child["id"], "name": child["name"], "pipeline_run_id": run["id"]})
        return running

    def list_experiments(self) -> list[str]:
        return q.list_experiments(self.store)

    # -- authoring -------------------------------------------------------------------------

    def snapshot(self, source_directory: str) -> str:
        return self.snapshots([source_directory])[source_directory]

    def start_snapshots(self, source_directories: list[str]) -> Callable[[], dict[str, str]]:
        """``snapshots``, taken when the function returned is called (in this process, nothing
        is gained by taking them sooner)."""
        return lambda: self.snapshots(source_directories)

    def snapshots(self, source_directories: list[str], limits: tuple[int, int] | None = None) -> dict[str, str]:
        """Snapshot each folder; what is new is recorded in ONE write transaction for them all (a
        pipeline of 20 step folders paid 20 before), and an unchanged folder costs none. ``limits``:
        (max files, max bytes) as the submitting process has them (``snapshot_limits``)."""
        max_files, max_bytes = limits or snapshot_limits(self._config)
        recorded: dict[str, bool] = {}

        def is_recorded(digest: str) -> bool:
            if digest not in recorded:
                recorded[digest] = q.snapshot_recorded(self.store, digest)
            return recorded[digest]

        digests: dict[str, str] = {}
        new: dict[str, tuple[Any, str]] = {}  # snapshot digest -> (snapshot, manifest digest) to record
        stat_updates: dict[str, Any] = {}
        real = {folder: real_path(folder) for folder in source_directories}
        caches = q.load_stat_caches(self.store, [src + os.sep for src in real.values()])
        # a local datastore in a source folder is data, not code (one query for them all)
        data = frozenset(real_path(root) for root in local_datastore_roots(self.store, self.layout).values())
        for source_directory, src in real.items():
            snap = take_snapshot(src, self.objects, caches[src + os.sep], max_files=max_files, max_bytes=max_bytes,
                                 is_recorded=is_recorded, exclude=data)
            if not is_recorded(snap.digest) and snap.digest not in new:  # a recorded one has its manifest stored
                new[snap.digest] = (snap, self.objects.put_bytes(json.dumps(snap.manifest, sort_keys=True).encode()))
            stat_updates.update(snap.stat_updates)
            digests[source_directory] = snap.digest
        remote = self._remote_default() if new else None
        if remote is not None:  # the snapshots live with the runs in the default object store too
            from cairn.storage.datastores import upload

            # uploaded before they are recorded: a failed upload leaves them new, so the next submit tries again
            objects = {e.digest for n, _ in new.values() for e in n.entries} | {m for _, m in new.values()}
            files = [(str(self.objects.path_for(d)), f"snapshots/objects/{d.split(':', 1)[1]}") for d in sorted(objects)]
            upload(remote, files, overwrite=False, show_progress=len(files) > 200)
        if new or stat_updates:
            q.record_snapshots(self.store, [(n.digest, m, len(n.entries), n.size) for n, m in new.values()],
                               stat_updates)
        return digests

    def submit_pipeline(self, experiment: str, name: str, spec: GraphSpec, *, tags: dict[str, str],
                        properties: dict[str, str], step_properties: dict[str, dict[str, str]],
                        regenerate_outputs: bool, continue_on_step_failure: bool) -> tuple[str, dict[str, str]]:
        recorded = self.record_pipeline_run(
            experiment, name, spec, tags=tags, properties=properties, step_properties=step_properties,
            regenerate_outputs=regenerate_outputs, continue_on_step_failure=continue_on_step_failure)
        agent_client.ensure_agent(self.layout)
        return recorded

    def record_pipeline_run(self, experiment: str, name: str, spec: GraphSpec, *, tags: dict[str, str],
                            properties: dict[str, str], step_properties: dict[str, dict[str, str]],
                            regenerate_outputs: bool, continue_on_step_failure: bool) -> tuple[str, dict[str, str]]:
        """Queue the run (what ``submit_pipeline`` does before it makes sure an agent serves it)."""
        run_id = ids.new_id("run")
        step_ids = {s.name: ids.new_id("step") for s in spec.steps}
        q.insert_pipeline_run(
            self.store, run_id=run_id, experiment=experiment, name=name, spec_json=spec.to_json(),
            steps=[(step_ids[s.name], s.name) for s in spec.steps], tags=tags, properties=properties,
            step_properties={step_ids[k]: v for k, v in step_properties.items()},
            regenerate_outputs=regenerate_outputs, continue_on_step_failure=continue_on_step_failure)
        return run_id, step_ids

    # -- runs ------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        return q.get_run(self.store, run_id)

    def list_runs(self, experiment: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return q.list_runs(self.store, experiment, limit)

    def get_children(self, run_id: str) -> list[dict[str, Any]]:
        return q.child_runs(self.store, run_id)

    def get_events(self, run_id: str) -> list[dict[str, Any]]:
        return q.run_events(self.store, run_id)

    def cancel_run(self, run_id: str) -> dict[str, Any] | None:
        run = q.get_run(self.store, run_id)
        if run is None:
            return None
        target = run["parent_id"] or run_id  # canceling a step cancels its pipeline run
        row = q.request_cancel(self.store, target)
        if row is not None and not Status(row["status"]).is_terminal:
            agent_client.ensure_agent(self.layout)  # a claimed run needs a live agent to stop its steps
        return row

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        q.set_tags(self.store, run_id, tags)

    def add_properties(self, run_id: str, props: dict[str, Any]) -> list[str]:
        return q.add_properties(self.store, run_id, props)

    def get_tags(self, run_id: str) -> dict[str, Any]:
        return q.get_kv(self.store, run_id, "tags")

    def get_properties(self, run_id: str) -> dict[str, Any]:
        return q.get_kv(self.store, run_id, "properties")

    def log_metric(self, run_id: str, name: str, kind: str, value: Any) -> None:
        q.add_metric(self.store, run_id, name, kind, value)

    def log_metrics(self, run_id: str, rows: list[tuple[str, str, Any, float]]) -> None:
        q.add_metrics(self.store, run_id, rows)

    def get_metric_rows(self, run_ids: list[str]) -> list[dict[str, Any]]:
        return q.get_metric_rows(self.store, run_ids)

    def get_outputs(self, step_run_id: str) -> dict[str, dict[str, Any]]:
        outs = q.get_outputs(self.store, step_run_id)
        roots = local_datastore_roots(self.store, self.layout)  # one query, no credentials decrypted
        for o in outs.values():
            o["local_path"] = str(Path(roots[o["datastore"]]) / o["path"]) if o["datastore"] in roots else None
        return outs

    def fetch_output(self, output: dict[str, Any], dest: Path, overwrite: bool) -> tuple[int, int]:
        """Copy an output that lives in an object store into ``dest``; (copied, kept) file counts."""
        from cairn.data.datasets import fetch, resolve_files

        files = resolve_files({"paths": [{"datastore": output["datastore"], "path": output["path"]}]},
                              self.datastore_location)
        wanted = [f for f in files if overwrite or not (dest / f.relative).exists()]
        fetch(wanted, self.datastore_location, dest)
        return len(wanted), len(files) - len(wanted)

    def run_folder(self, run_id: str, run: dict[str, Any] | None = None) -> Path:
        run = run or q.get_run(self.store, run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r} in workspace {self.location}")
        rel = run_dir(run["parent_id"], run_id) if run["parent_id"] else run_dir(run_id)
        return local_run_root(self.store, self.layout) / rel

    def _remote_default(self) -> Any:
        """The default datastore's location when it is an object store, else None."""
        default = next((d for d in self.list_datastores() if d["is_default"]), None)
        if default is None or default["kind"] == "local":
            return None
        return self.datastore_location(default["name"])

    def read_log(self, run_id: str, which: str, offset: int = 0, complete: bool = True,
                 partial: bool = False) -> tuple[str, int]:
        """Text of a step's ``stdout``/``stderr``/``system`` log from byte ``offset``, and the new offset.

        ``complete=False`` (following a live log) holds back a last line that has no newline yet, or
        with ``partial`` only a last character not whole yet."""
        row = q.get_run(self.store, run_id)
        if row is None:
            raise NotFoundError(f"no run with id {run_id!r} in workspace {self.location}")
        # a reused step never ran: its system log is what its record says (the agent writes no file
        # for it; an earlier, interrupted attempt may have left lines before)
        reused = (f"{row['status_reason']} (fingerprint {row['fingerprint']})\n".encode()
                  if which == "system" and row["status"] == Status.REUSED.value else b"")
        path = self.run_folder(run_id, row) / "logs" / f"{which}.txt"
        # not in this machine's cache: read it from the default object store (a reused step's log
        # is never there: only an attempt that ended uploads its logs)
        remote = self._remote_default() if not reused and not path.exists() else None
        if remote is not None:
            fs, root = remote.filesystem()
            rel = path.relative_to(local_run_root(self.store, self.layout)).as_posix()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(path))
            except Exception:
                return "", offset
        try:
            with open(path, "rb") as f:
                if reused:
                    data = (f.read() + reused)[offset:]
                else:
                    f.seek(offset)
                    data = f.read()
        except FileNotFoundError:
            if not reused:
                return "", offset
            data = reused[offset:]
        # while following, never split a line or a UTF-8 character: keep a partial last line back
        # (a line redrawn with carriage returns, a progress bar, is given up to its latest drawing;
        # a last carriage return may be half of a "\r\n": kept back)
        if complete or data.endswith(b"\n"):
            cut = len(data)
        elif partial:
            cut = _whole_characters(data)
            cut -= data[:cut].endswith(b"\r")  # half of a "\r\n", perhaps
        else:
            end = len(data) - 1 if data.endswith(b"\r") else len(data)
            cut = max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1
        return data[:cut].decode("utf-8", "replace"), offset + cut

    def put_artifact(self, run_id: str, name: str, local_path: str) -> str:
        from cairn.storage.paths import confined

        dest = confined(self.run_folder(run_id) / "artifacts", name, "artifact name")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, dest)
        remote = self._remote_default()
        if remote is not None:  # artifacts live with the run in the default object store too
            from cairn.storage.datastores import upload

            rel = dest.relative_to(local_run_root(self.store, self.layout)).as_posix()
            upload(remote, [(str(dest), rel)], overwrite=True, show_progress=False)
        return str(dest)

    def register_dataset(self, **fields: Any) -> dict[str, Any]:
        return q.register_dataset(self.store, **fields)

    def get_dataset(self, *, dataset_id: str | None = None, name: str | None = None,
                    version: int | None = None) -> dict[str, Any] | None:
        return q.get_dataset(self.store, dataset_id=dataset_id, name=name, version=version)

    def list_datasets(self) -> list[dict[str, Any]]:
        return q.list_datasets(self.store)

    def dataset_lineage(self, name: str) -> list[dict[str, Any]]:
        """Every version of a dataset with the step runs that produced and consumed it."""
        versions = q.dataset_versions(self.store, name)
        if not versions:
            known = ", ".join(sorted(r["name"] for r in q.list_datasets(self.store))) or "none"
            raise NotFoundError(f"no dataset {name!r} in this workspace (registered: {known})")
        return [{"id": v["id"], "version": v["version"], "kind": v["kind"], "content_digest": v["content_digest"],
                 "file_count": v["file_count"], "size": v["size"], "created_at": v["created_at"],
                 "description": v["description"], "tags": json.loads(v["tags"]),
                 **q.runs_with_dataset(self.store, f"{name}:{v['version']}")} for v in versions]

    def register_environment(self, name: str, definition: dict[str, Any], spec_digest: str) -> dict[str, Any]:
        return q.register_environment(self.store, name, definition, spec_digest)

    def get_environment(self, name: str, version: int | None = None) -> dict[str, Any] | None:
        return q.get_environment(self.store, name, version)

    def list_environments(self) -> list[dict[str, Any]]:
        """The latest version of each registered environment."""
        latest: dict[str, dict[str, Any]] = {}
        for row in q.list_environments(self.store):
            latest[row["name"]] = row
        return list(latest.values())

    def environments_in_use(self) -> set[str]:
        """Cache keys of the built environments that steps of unfinished runs still need."""
        from cairn.environments.spec import cache_key, is_managed

        keys = set()
        for spec_json in q.unfinished_run_specs(self.store):
            for step in json.loads(spec_json).get("steps", []):
                env = step.get("environment") or {}
                if is_managed(env):
                    keys.add(cache_key(env))
        return keys

    def artifact_path(self, run_id: str, name: str) -> Path:
        from cairn.storage.paths import confined

        return confined(self.run_folder(run_id) / "artifacts", name, "artifact name")

    def list_artifacts(self, run_id: str) -> list[str]:
        root = self.run_folder(run_id) / "artifacts"
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def explain(self, step_run_id: str) -> dict[str, Any]:
        run = q.get_run(self.store, step_run_id)
        if run is not None and run["kind"] == "pipeline":
            steps = ", ".join(f"{c['name']} ({c['id']})" for c in q.child_runs(self.store, step_run_id))
            raise UserInputError(f"{step_run_id} is a pipeline run; explain one of its step runs: {steps}")
        if run is None or run["kind"] != "step":
            raise NotFoundError(f"no step run with id {step_run_id!r} in workspace {self.location}")
        parts = json.loads(run["fingerprint_parts"]) if run["fingerprint_parts"] else None
        result: dict[str, Any] = {"step_run_id": step_run_id, "step": run["name"], "status": run["status"],
                                  "pipeline_run_id": run["parent_id"], "fingerprint": run["fingerprint"],
                                  "parts": parts, "reused_from": run["reused_from"], "changes": [],
                                  "compared_with": None, "summary": ""}
        if parts is None:
            result["summary"] = f"the step did not get as far as a fingerprint ({run['status']}: " \
                                f"{run['status_reason'] or 'no reason recorded'})"
            return result
        if run["fingerprint"] is None and run["status"] == Status.COMPLETED.value:
            result["summary"] = _UNKEYED
            return result
        if run["status"] == Status.REUSED.value:
            source = q.get_run(self.store, run["reused_from"]) or {}
            result["summary"] = (f"reused: every part of the fingerprint matches step run {run['reused_from']} "
                                 f"of pipeline run {source.get('parent_id')}")
            return result
        prev = q.previous_step_run(self.store, run["experiment"], run["name"], run["created_at"], step_run_id)
        pipeline = q.get_run(self.store, run["parent_id"]) or {}
        spec = GraphSpec.from_json(pipeline["spec"]) if pipeline.get("spec") else None
        allow_reuse = spec.step(run["name"]).allow_reuse if spec else True
        unkeyed = q.previous_step_run(self.store, run["experiment"], run["name"], run["created_at"], step_run_id,
                                      keyed=False) if prev is None else None
        if prev is None and unkeyed is not None and unkeyed["status"] == Status.COMPLETED.value:
            result["compared_with"] = unkeyed["id"]
            result["summary"] = (f"ran: the earlier run of step {run['name']!r}, {unkeyed['id']}, has no fingerprint "
                                 f"to be reused by ({_UNKEYED})")
        elif prev is None:
            result["summary"] = f"ran: no earlier run of step {run['name']!r} in experiment {run['experiment']!r}"
        else:
            old = json.loads(prev["fingerprint_parts"])
            result["compared_with"] = prev["id"]
            own_script = parts.get("script") if parts.get("script") == old.get("script") else None
            if spec is not None and sum(s.snapshot == parts.get("snapshot") for s in spec.steps) < 2:
                own_script = None  # the hint is for steps sharing a folder: this one has its own
            step_env = spec.step(run["name"]).environment if spec is not None else None
            result["changes"] = [self._describe(k, old.get(k), parts.get(k), prev, own_script, step_env)
                                 for k in differing_parts(old, parts)]
            if result["changes"]:
                result["summary"] = f"ran: {len(result['changes'])} part(s) differ from step run {prev['id']}"
            elif not allow_reuse:
                result["summary"] = "ran: reuse is off for this step (allow_reuse=False)"
            elif pipeline.get("regenerate_outputs"):
                result["summary"] = "ran: the pipeline was submitted with regenerate_outputs=True"
            elif prev["status"] != Status.COMPLETED.value and prev["status"] != Status.REUSED.value:
                result["summary"] = (f"ran: same fingerprint as step run {prev['id']}, which did not complete "
                                     f"({prev['status']}): nothing to reuse")
            else:
                result["summary"] = (f"ran: same fingerprint as step run {prev['id']}, whose outputs were not "
                                     f"available for reuse (gone or changed since)")
        if run["status"] in (Status.FAILED.value, Status.CANCELED.value):
            result["summary"] = f"{run['status'].lower()} ({run['status_reason']}); " + result["summary"]
        if not allow_reuse and "allow_reuse" not in result["summary"]:
            result["summary"] += " (reuse is off for this step: allow_reuse=False)"
        elif pipeline.get("regenerate_outputs") and "regenerate" not in result["summary"]:
            result["summary"] += " (submitted with regenerate_outputs=True)"
        return result

    def _environment_change(self, prev: dict[str, Any], new: dict[str, Any]) -> str:
        """What differs between the environment step run ``prev`` ran with and ``new`` ("pip
        six==1.16.0 -> six==1.17.0"), or "" when the earlier one is not known."""
        pipeline = q.get_run(self.store, prev["parent_id"]) or {}
        try:
            old = GraphSpec.from_json(pipeline["spec"]).step(prev["name"]).environment if pipeline.get("spec") else None
        except (KeyError, ValueError):
            old = None
        if not isinstance(old, dict):
            return ""
        said = []
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if a == b:
                continue
            if isinstance(a, list | type(None)) and isinstance(b, list | type(None)):
                gone = [x for x in a or [] if x not in (b or [])]
                came = [x for x in b or [] if x not in (a or [])]
                said.append(f"{key} {', '.join(map(str, gone)) or '(none)'} -> {', '.join(map(str, came)) or '(none)'}")
            elif isinstance(a, dict) and isinstance(b, dict):
                names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                said.append(f"{key} " + ", ".join(f"{n} {a.get(n)!r} -> {b.get(n)!r}" for n in names))
            else:
                said.append(f"{key} {a!r} -> {b!r}")
        return "; ".join(said)

    def _describe(self, key: str, old: Any, new: Any, prev: dict[str, Any], own_script: str | None,
                  step_env: dict[str, Any] | None) -> str:
        """One fingerprint part that differs from ``prev``'s, in words. ``own_script``: the step's
        script when it kept its name; ``step_env``: its environment now, when known."""
        if key == "snapshot":
            a, b = q.get_snapshot(self.store, old or ""), q.get_snapshot(self.store, new or "")
            if not (a and b):
                return "snapshot changed"
            files = diff_manifests(load_manifest(self.objects, a["manifest"]), load_manifest(self.objects, b["manifest"]))
            if not files:
                return "snapshot changed: file modes changed"
            said = "snapshot changed: " + ", ".join(files[:10]) + (" ..." if len(files) > 10 else "")
            if own_script and own_script not in (entry.rsplit(" ", 1)[0] for entry in files):
                # the common cause of "I edited one step and all ran"
                said += (f" (not this step's script {own_script}: steps that share a source_directory share its "
                         f"snapshot; a folder of its own reruns only the steps whose files changed)")
            return said
        if key == "environment" and step_env is not None:
            what = self._environment_change(prev, step_env)
            if what:
                return f"environment changed: {what}"
        if key.startswith("input:"):
            if old is None:
                return f"input {key[6:]} added"
            if new is None:
                return f"input {key[6:]} removed"
            return f"input {key[6:]} changed"
        if key in ("params", "environment_variables") and isinstance(old, dict) and isinstance(new, dict):
            names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return f"{key} changed: " + ", ".join(f"{n} {old.get(n)!r} -> {new.get(n)!r}" for n in names)
        return f"{key} changed: {old!r} -> {new!r}"


def _whole_characters(data: bytes) -> int:
    """How much of ``data`` ends on a whole UTF-8 character (a writer may be in the middle of one)."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 == 0x80:  # a continuation byte: the character began further back
            continue
        needs = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        return len(data) - back if back < needs else len(data)
    return len(data)

"""Compute targets as users see them: ``ComputeTarget(ws, "local")``, ``ComputeTarget.create``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cairn.core.errors import CairnError, NotFoundError, UserInputError
from cairn.core.names import check_compute_name, check_type

if TYPE_CHECKING:
    from cairn.client.workspace import Workspace


def _warn_unimportable(modules: tuple[str, ...]) -> None:
    """A warm-start module this interpreter cannot find is most likely misspelled: a server could not
    preload it, and its steps would import it themselves each time, silently slower."""
    import sys
    import warnings

    missing_tops: set[str] = set()
    for name in dict.fromkeys(modules):
        top, *parts = name.split(".")
        if top in missing_tops:
            continue
        spec = _top_spec(top)
        if spec is None:
            missing_tops.add(top)
            name = top
        elif _found_below(spec, parts):
            continue
        warnings.warn(f"warm_start_modules: no module named {name!r} can be imported here ({sys.executable}, "
                      f"outside this script's folder); unless the steps' environment has it, the warm-start "
                      f"server cannot preload it and each step imports it itself (check the spelling)",
                      UserWarning, stacklevel=3)


def _findable(name: str) -> bool:
    """Whether a module can be found as the agent's fork server looks for it: not in the folder of
    the script that runs this (``sys.path[0]``, a server does not have it), nothing imported."""
    top, *parts = name.split(".")
    spec = _top_spec(top)
    return spec is not None and _found_below(spec, parts)


def _found_below(spec: Any, parts: list[str]) -> bool:
    """Whether the submodule ``parts`` of the package ``spec`` can be found: looked for in its
    package's folders; where the package may add folders or modules as it is imported (its
    ``__init__`` names ``__path__`` or ``sys.modules``), or below a plain module (``os.path``), what
    its import makes cannot be told without importing it: taken as there."""
    import importlib.machinery

    for part in parts:
        locations = spec.submodule_search_locations
        if locations is None or _extends_itself(spec):
            return True
        try:
            spec = importlib.machinery.PathFinder.find_spec(part, list(locations))
        except Exception:  # (a package's own path object that fails: says nothing either way)
            return True
        if spec is None:
            return False
    return True


def _extends_itself(spec: Any) -> bool:
    """Whether a package's ``__init__`` may add to its folders or modules as it is imported (Keras,
    ``pkgutil.extend_path``, generated API packages): read, not run."""
    origin = getattr(spec, "origin", None)
    if origin is None or not getattr(spec, "has_location", False):  # a namespace package: no code of its own
        return False
    if not origin.endswith(".py"):  # compiled: cannot be read
        return True
    try:
        with open(origin, "rb") as f:
            source = f.read()
    except OSError:
        return True
    return b"__path__" in source or b"sys.modules" in source


def _top_spec(top: str) -> Any:
    import importlib.machinery
    import sys

    search = sys.path if sys.flags.safe_path else sys.path[1:]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(top, search if finder is importlib.machinery.PathFinder else None)
        except Exception:  # (a finder of someone else's that fails: says nothing either way)
            continue
        if spec is not None:
            return spec
    return None


@dataclass(frozen=True)
class LocalComputeConfiguration:
    max_concurrency: int | None = None
    warm_start_modules: tuple[str, ...] = ()
    spare_interpreters: bool | str = True
    kind: str = "local"

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.max_concurrency is not None:
            config["max_concurrency"] = self.max_concurrency
        if self.warm_start_modules:
            config["warm_start_modules"] = list(self.warm_start_modules)
        if self.spare_interpreters is False or self.spare_interpreters == "started":
            config["spare_interpreters"] = self.spare_interpreters
        return config


class LocalCompute:
    """The built-in target kind that runs steps as subprocesses of this machine."""

    @staticmethod
    def provisioning_configuration(max_concurrency: int | None = None,
                                   warm_start_modules: list[str] | None = None,
                                   spare_interpreters: bool | str = True) -> LocalComputeConfiguration:
        """``warm_start_modules`` (opt-in): steps are forked from a per-environment server that
        imported these modules once (e.g. ``["pandas", "sklearn.linear_model"]``: list submodules the
        steps import, a package's import does not import them), instead of each step paying for the
        imports. Do not use it for modules that start threads, open GPU contexts or network
        connections, or read environment variables at import time.

        ``spare_interpreters`` (on by default): each step still runs in a new interpreter of its
        own, whose start is off the pipeline's path. ``True`` or ``"forked"``: forked, for each step,
        from an interpreter of the step's environment that has only started, and that imports the
        standard-library modules earlier steps imported (under half a cold start's CPU; the steps
        share Python's hash seed and find those modules in ``sys.modules``). ``"started"``: each one
        started ahead while earlier steps ran and a core was free (its own hash seed, nothing
        imported ahead). ``False``: each step's interpreter starts when the step does."""
        if max_concurrency is not None:
            check_type(max_concurrency, int, "max_concurrency")
            if max_concurrency < 1:
                raise UserInputError(f"max_concurrency must be at least 1, not {max_concurrency}")
        modules: tuple[str, ...] = ()
        if warm_start_modules is not None:
            if isinstance(warm_start_modules, str) or not all(
                    isinstance(m, str) and all(part.isidentifier() for part in m.split("."))
                    for m in warm_start_modules):
                raise UserInputError(f"warm_start_modules must be a list of absolute module names such as "
                                     f"['pandas', 'sklearn.ensemble'] (no relative or empty parts), not "
                                     f"{warm_start_modules!r}")
            if "__main__" in (m.partition(".")[0] for m in warm_start_modules):
                raise UserInputError("warm_start_modules: '__main__' is the step's own script, which each step "
                                     "runs itself: name the modules it imports")
            modules = tuple(warm_start_modules)
        if not (isinstance(spare_interpreters, bool) or spare_interpreters in ("forked", "started")):
            raise UserInputError(f"spare_interpreters must be True, False, 'forked' or 'started', not "
                                 f"{spare_interpreters!r}")
        return LocalComputeConfiguration(max_concurrency, modules, spare_interpreters)


@dataclass(frozen=True)
class RayAttachConfiguration:
    address: str
    retries: int = 1
    kind: str = "ray"

    def to_config(self) -> dict[str, Any]:
        return {"address": self.address, "managed": False, "retries": self.retries}


@dataclass(frozen=True)
class RayProvisioningConfiguration:
    min_nodes: int = 0
    max_nodes: int = 4
    cpus_per_node: int | None = None
    gpus_per_node: int | None = None
    retries: int = 1
    kind: str = "ray"

    def to_config(self) -> dict[str, Any]:
        return {"managed": True, "min_nodes": self.min_nodes, "max_nodes": self.max_nodes,
                "cpus_per_node": self.cpus_per_node, "gpus_per_node": self.gpus_per_node, "retries": self.retries}


def _count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{what} must be a whole number of at least {minimum}, not {value!r}")
    return value


class RayCompute:
    """Steps as Ray tasks on a Ray cluster: attach an existing one, or provision one on this
    machine (a head and worker processes on 127.0.0.1). For a cluster of several machines, start
    it with Ray's cluster launcher (``ray up cluster.yaml``) and attach to its head."""

    @staticmethod
    def attach_configuration(address: str, retries: int = 1) -> RayAttachConfiguration:
        if not isinstance(address, str) or ":" not in address or not address.rsplit(":", 1)[1].isdigit():
            raise UserInputError(f"address must be the Ray head's 'HOST:PORT' (e.g. '127.0.0.1:6379'), not "
                                 f"{address!r}")
        return RayAttachConfiguration(address.removeprefix("ray://"), _count(retries, "retries", 0))

    @staticmethod
    def provisioning_configuration(min_nodes: int = 0, max_nodes: int = 4, cpus_per_node: int | None = None,
                                   gpus_per_node: int | None = None, retries: int = 1,
                                   **ignored: Any) -> RayProvisioningConfiguration:
        """``min_nodes`` nodes are started here (the head counts as one; at least the head);
        ``max_nodes`` is recorded for Ray's autoscaler on a real cluster. Azure ML's other
        arguments (vm_size, idle_seconds_before_scaledown, ...) are accepted and ignored."""
        _count(min_nodes, "min_nodes", 0)
        _count(max_nodes, "max_nodes", 1)
        if min_nodes > max_nodes:
            raise UserInputError(f"min_nodes ({min_nodes}) cannot exceed max_nodes ({max_nodes})")
        for value, what in ((cpus_per_node, "cpus_per_node"), (gpus_per_node, "gpus_per_node")):
            if value is not None:
                _count(value, what, 1 if what == "cpus_per_node" else 0)
        return RayProvisioningConfiguration(min_nodes, max_nodes, cpus_per_node, gpus_per_node,
                                            _count(retries, "retries", 0))


class ComputeTarget:
    """A named compute target of a workspace. ``ComputeTarget(ws, name)`` looks one up."""

    def __init__(self, workspace: Workspace, name: str) -> None:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "ComputeTarget workspace")
        check_type(name, str, "compute target name")
        records = workspace._backend.list_compute_targets()
        for c in records:
            if c["name"] == name:
                self._load(workspace, c)
                return
        known = ", ".join(repr(c["name"]) for c in records) or "none"
        raise NotFoundError(f"compute target {name!r} does not exist in this workspace (known: {known}); "
                            f"create it with ComputeTarget.create(ws, {name!r}, ...)")

    @classmethod
    def _from_record(cls, workspace: Workspace, record: dict[str, Any]) -> ComputeTarget:
        self = cls.__new__(cls)
        self._load(workspace, record)
        return self

    def _load(self, workspace: Workspace, record: dict[str, Any]) -> None:
        self.workspace = workspace
        self.name: str = record["name"]
        self.type: str = record["kind"]
        self.config: dict[str, Any] = dict(record["config"])

    @classmethod
    def create(cls, workspace: Workspace, name: str, provisioning_configuration: Any) -> ComputeTarget:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "ComputeTarget.create workspace")
        check_compute_name(name)
        if not isinstance(provisioning_configuration, (LocalComputeConfiguration, RayProvisioningConfiguration)):
            raise UserInputError(f"provisioning_configuration must come from "
                                 f"LocalCompute.provisioning_configuration(...) or "
                                 f"RayCompute.provisioning_configuration(...), not "
                                 f"{type(provisioning_configuration).__name__}")
        _check_replaceable(workspace, name, provisioning_configuration.kind)
        if isinstance(provisioning_configuration, LocalComputeConfiguration):
            _warn_unimportable(provisioning_configuration.warm_start_modules)
        config = provisioning_configuration.to_config()
        if isinstance(provisioning_configuration, RayProvisioningConfiguration):  # started now, awaited later
            config = workspace._backend.provision_ray_cluster(name, config)
        workspace._backend.put_compute_target(name, provisioning_configuration.kind, config)
        return cls(workspace, name)

    @classmethod
    def attach(cls, workspace: Workspace, name: str, attach_configuration: Any) -> ComputeTarget:
        """Attach an existing cluster (``RayCompute.attach_configuration(address=...)``)."""
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "ComputeTarget.attach workspace")
        check_compute_name(name)
        if not isinstance(attach_configuration, RayAttachConfiguration):
            raise UserInputError(f"attach_configuration must come from RayCompute.attach_configuration(...), "
                                 f"not {type(attach_configuration).__name__}")
        _check_replaceable(workspace, name, "ray")
        from cairn.compute.ray_cluster import probe

        port = attach_configuration.address.rsplit(":", 1)[1]
        try:
            probe(attach_configuration.address, timeout=5)
        except ConnectionError as exc:
            raise UserInputError(f"cannot attach {name!r}: {exc}; start a head with `ray start --head "
                                 f"--port={port}` or check the address") from None
        workspace._backend.put_compute_target(name, "ray", attach_configuration.to_config())
        return cls(workspace, name)

    @classmethod
    def list(cls, workspace: Workspace) -> list[ComputeTarget]:
        return list(workspace.compute_targets.values())

    def wait_for_completion(self, show_output: bool = False, timeout_seconds: float = 120) -> None:
        """Local targets are ready at once; a provisioned Ray cluster when all its nodes joined."""
        if self.type != "ray":
            return
        show = (lambda line: print(f"{self.name}: {line}", flush=True)) if show_output else None
        try:
            nodes = self.workspace._backend.wait_for_ray_cluster(self.config, timeout_seconds, show)
        except TimeoutError as exc:
            raise CairnError(f"compute target {self.name!r}: {exc}") from None
        if show_output:
            print(f"{self.name}: Succeeded, {len(nodes)} node(s) at {self.config['address']}", flush=True)

    def get_status(self) -> dict[str, Any]:
        """State, nodes, CPUs, GPUs, memory, and the steps running on the target now."""
        import os

        running = self.workspace._backend.running_steps_on(self.name)
        if self.type != "ray":
            return {"name": self.name, "type": self.type, "state": "Ready", "running_steps": running,
                    "max_concurrency": self.config.get("max_concurrency") or os.cpu_count()}
        try:
            alive = self.workspace._backend.ray_cluster_nodes(self.config["address"])
        except Exception as exc:  # the cluster is gone or unreachable: say so, do not raise
            return {"name": self.name, "type": "ray", "state": "Unreachable", "address": self.config["address"],
                    "error": f"{type(exc).__name__}: {exc}", "running_steps": running, "nodes": []}
        nodes = [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
                  "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0),
                  "memory_gb": round(n["Resources"].get("memory", 0) / 1024 ** 3, 2)} for n in alive]
        return {"name": self.name, "type": "ray", "state": "Succeeded" if nodes else "Unreachable",
                "address": self.config["address"], "managed": bool(self.config.get("managed")),
                "nodes": nodes, "node_count": len(nodes), "cpus": sum(n["cpus"] for n in nodes),
                "gpus": sum(n["gpus"] for n in nodes), "memory_gb": round(sum(n["memory_gb"] for n in nodes), 2),
                "running_steps": running}

    def delete(self) -> None:
        """Remove the target; a Ray cluster Cairn started here is stopped with it."""
        if self.name == "local":
            raise UserInputError("the built-in 'local' target cannot be deleted")
        if self.type == "ray" and not self.config.get("managed"):
            raise UserInputError(f"compute target {self.name!r} is an attached Ray cluster that Cairn did not "
                                 f"start: use detach() (the cluster keeps running)")
        self.workspace._backend.delete_compute_target(self.name)  # stops the nodes Cairn started

    def detach(self) -> None:
        """Forget an attached cluster (it keeps running)."""
        if self.type != "ray" or self.config.get("managed"):
            raise UserInputError(f"compute target {self.name!r} was not attached: use delete()")
        self.workspace._backend.delete_compute_target(self.name)

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, type={self.type!r})"


def _check_replaceable(workspace: Workspace, name: str, kind: str) -> None:
    """A target may be made again under its name (new settings apply from the next dispatch), but
    ``local`` stays this machine, and a Ray cluster Cairn started is never left running unnamed."""
    if name == "local" and kind != "local":
        raise UserInputError("'local' is the built-in target of this machine; give the Ray cluster another name "
                             "(e.g. 'ray-cluster')")
    existing = next((t for t in workspace._backend.list_compute_targets() if t["name"] == name), None)
    if existing is not None and existing["kind"] == "ray" and existing["config"].get("managed"):
        raise UserInputError(f"compute target {name!r} is a Ray cluster Cairn started (at "
                             f"{existing['config'].get('address')}); use ComputeTarget(ws, {name!r}), or "
                             f"ComputeTarget(ws, {name!r}).delete() first (it stops the cluster) to make it anew")

"""What the engine needs to know of the workspace it serves: store, objects, datastore roots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cairn.core.errors import NotFoundError
from cairn.storage.datastores import DatastoreLocation
from cairn.storage.layout import WorkspaceLayout
from cairn.storage.objects import ObjectStore
from cairn.storage.secrets import SecretBox
from cairn.store import queries as q
from cairn.store.db import Store

DEFAULT_DATASTORE = "workspaceblobstore"


@dataclass
class EngineContext:
    layout: WorkspaceLayout
    store: Store
    objects: ObjectStore

    @classmethod
    def open(cls, layout: WorkspaceLayout) -> EngineContext:
        store = Store.for_sqlite_file(layout.db, create=False)  # the agent's: never makes an empty one
        store.migrate()
        return cls(layout, store, ObjectStore(layout.objects))

    def datastore_roots(self) -> dict[str, str]:
        """Local roots of the workspace's folder datastores, by name."""
        return local_datastore_roots(self.store, self.layout)

    def datastore_location(self, name: str) -> DatastoreLocation:
        return locate_datastore(self.store, self.layout, name)

    def local_run_root(self) -> Path:
        """Where run folders (logs, staging) are written on this machine: the default datastore's
        own folder, or a local cache when the default datastore is an object store (logs are then
        uploaded to it when each step ends)."""
        return local_run_root(self.store, self.layout)

    def default_datastore(self) -> str:
        for d in q.list_named(self.store, "datastores"):
            if d["is_default"]:
                return d["name"]
        return DEFAULT_DATASTORE


SEALED = "sealed_credentials"  # the config key holding a datastore's encrypted credentials


def _local_root(config: dict[str, object], layout: WorkspaceLayout) -> Path:
    """A folder datastore's root: absolute as registered, or relative to ``.cairn/``."""
    path = Path(str(config.get("path", "")))
    return path if path.is_absolute() else layout.dot / path


def local_datastore_roots(store: Store, layout: WorkspaceLayout) -> dict[str, str]:
    """Local roots of the folder datastores, by name (object stores have none), in one query."""
    return {d["name"]: str(_local_root(d["config"], layout))
            for d in q.list_named(store, "datastores") if d["kind"] == "local"}


def locate_datastore(store: Store, layout: WorkspaceLayout, name: str) -> DatastoreLocation:
    """A registered datastore with its credentials decrypted (they never leave the process)."""
    for d in q.list_named(store, "datastores"):
        if d["name"] == name:
            config = dict(d["config"])
            sealed = config.pop(SEALED, None)
            if d["kind"] == "local":
                config["path"] = str(_local_root(config, layout))
            secrets = SecretBox(layout.dot / "secret.key").open(sealed) if sealed else {}
            return DatastoreLocation(name, d["kind"], config, secrets)
    raise NotFoundError(f"datastore {name!r} is not registered in workspace {layout.root}")


def local_run_root(store: Store, layout: WorkspaceLayout) -> Path:
    for d in q.list_named(store, "datastores"):
        if d["is_default"]:
            if d["kind"] == "local":
                return _local_root(d["config"], layout)
            return layout.dot / "cache" / d["name"]
    return layout.datastores / DEFAULT_DATASTORE

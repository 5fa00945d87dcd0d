"""What the engine needs to know of the workspace it serves: store, objects, datastore roots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cairn.storage.layout import WorkspaceLayout
from cairn.storage.objects import ObjectStore
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
        store = Store.for_sqlite_file(layout.db)
        store.migrate()
        return cls(layout, store, ObjectStore(layout.objects))

    def datastore_roots(self) -> dict[str, str]:
        """Local roots of the workspace's folder datastores, by name."""
        roots = {}
        for d in q.list_named(self.store, "datastores"):
            if d["kind"] != "local":  # object stores have no local root
                continue
            path = Path(d["config"].get("path", ""))
            roots[d["name"]] = str(path if path.is_absolute() else self.layout.dot / path)
        return roots

    def default_datastore(self) -> str:
        for d in q.list_named(self.store, "datastores"):
            if d["is_default"]:
                return d["name"]
        return DEFAULT_DATASTORE

"""The backend protocol: every client operation. LocalBackend serves an embedded workspace;
a RemoteBackend (HTTP client of the team server) will implement the same protocol."""

from __future__ import annotations

import os
from typing import Any


def open_local_backend(workspace: str, store: Any = None) -> Any:
    """The workspace opened in this process (its store needs SQLAlchemy in this interpreter);
    ``store``: its store, when this process has it open already."""
    import sys

    from cairn.core.errors import CairnError

    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise CairnError(
            f"opening the workspace needs Cairn's dependencies (SQLAlchemy) in this interpreter ({sys.executable}); "
            f"install cairn into it, or run the step in an environment that has them") from None
    try:
        from cairn.backend.local import LocalBackend
        from cairn.storage.layout import WorkspaceLayout

        return LocalBackend(WorkspaceLayout(workspace), store)
    except (ImportError, TypeError, AttributeError) as exc:
        raise client_conflict(exc) from None


def client_conflict(exc: BaseException) -> BaseException:
    """``exc`` (Cairn's client failing to load in a step's environment), explained when the
    environment pins versions of Cairn's own dependencies (``$CAIRN_CLIENT_CONFLICTS``)."""
    conflicts = os.environ.get("CAIRN_CLIENT_CONFLICTS")
    if not conflicts:
        return exc
    from cairn.core.errors import CairnError

    return CairnError(
        f"Run.get_context() cannot load Cairn's client in this environment: it pins {conflicts}, and its own "
        f"versions come first on sys.path ({type(exc).__name__}: {exc}); unpin them or pin the versions Cairn uses")

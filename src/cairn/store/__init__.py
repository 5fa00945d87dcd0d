"""Metadata store: SQLAlchemy tables, Alembic migrations and the queries. Nothing above touches SQL."""

from cairn.store.db import Store

__all__ = ["Store"]

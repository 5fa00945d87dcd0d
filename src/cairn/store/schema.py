"""Tables of the metadata store (SQLAlchemy Core). Changes here need an Alembic revision."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()
LEASE_OWNER_WHERE = text("lease_owner IS NOT NULL")

experiments = Table(
    "experiments", metadata,
    Column("name", String(255), primary_key=True),
    Column("created_at", Float, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", String(40), primary_key=True),
    Column("experiment", String(255), ForeignKey("experiments.name"), nullable=False),
    Column("parent_id", String(40), ForeignKey("runs.id"), nullable=True),
    Column("kind", String(16), nullable=False),  # pipeline | step
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("ended_at", Float, nullable=True),
    Column("spec", Text, nullable=True),  # pipeline: the graph spec JSON
    Column("regenerate_outputs", Boolean, nullable=False, default=False),
    Column("continue_on_step_failure", Boolean, nullable=False, default=False),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("attempt", Integer, nullable=False, default=0),
    Column("pid", Integer, nullable=True),
    Column("pid_started", String(32), nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("fingerprint", String(80), nullable=True),
    Column("fingerprint_parts", Text, nullable=True),
    Column("reused_from", String(40), nullable=True),
    # a step: the record of the variables it inherited from its agent (runner/inherited.py), for debug
    Column("inherited_env", String(40), nullable=True),
    Index("ix_runs_parent", "parent_id"),
    Index("ix_runs_status", "status"),
    Index("ix_runs_experiment_name", "experiment", "name"),
    # partial: only active runs hold a lease (migration 0005). PostgreSQL's where is added by
    # migrations/env.py: naming it here loaded SQLAlchemy's PostgreSQL dialect (~50 ms) in every
    # process that imports the schema (each user script, each agent)
    Index("ix_runs_lease_owner", "lease_owner", sqlite_where=LEASE_OWNER_WHERE),
)

run_events = Table(
    "run_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(40), ForeignKey("runs.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("at", Float, nullable=False),
    Index("ix_run_events_run", "run_id"),
)

run_tags = Table(
    "run_tags", metadata,
    Column("run_id", String(40), ForeignKey("runs.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=True),
)

run_properties = Table(
    "run_properties", metadata,
    Column("run_id", String(40), ForeignKey("runs.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=True),
)

metrics = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(40), ForeignKey("runs.id"), nullable=False),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # scalar | list | row | table | image
    Column("value", Text, nullable=False),  # JSON
    Column("at", Float, nullable=False),
    Index("ix_metrics_run", "run_id"),
)

step_outputs = Table(
    "step_outputs", metadata,
    Column("step_run_id", String(40), ForeignKey("runs.id"), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("datastore", String(255), nullable=False),
    Column("path", Text, nullable=False),  # relative to the datastore root
    Column("digest", String(80), nullable=False),
    Column("size", Integer, nullable=False),
    Column("file_count", Integer, nullable=False),
    # (path, size, mtime) of every file at commit: a cheap check that nobody changed it since
    Column("stat_signature", String(80), nullable=True),
)

cache_entries = Table(
    "cache_entries", metadata,
    Column("fingerprint", String(80), primary_key=True),
    Column("step_run_id", String(40), ForeignKey("runs.id"), nullable=False),
    Column("created_at", Float, nullable=False),
    # the fingerprint without its inputs (engine.fingerprint.definition_of): whether a step of this
    # definition was ever cached, whatever its inputs were
    Column("definition", String(80), nullable=True),
    Index("ix_cache_entries_definition", "definition"),
)

datastores = Table(
    "datastores", metadata,
    Column("name", String(255), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("config", Text, nullable=False),  # JSON, never secrets in clear
    Column("is_default", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

compute_targets = Table(
    "compute_targets", metadata,
    Column("name", String(255), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("config", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

snapshots = Table(
    "snapshots", metadata,
    Column("digest", String(80), primary_key=True),
    Column("manifest", String(80), nullable=False),  # object digest of the manifest JSON
    Column("file_count", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

file_stat_cache = Table(
    "file_stat_cache", metadata,
    Column("path", Text, primary_key=True),
    Column("size", Integer, nullable=False),
    Column("mtime_ns", Integer, nullable=False),
    Column("inode", Integer, nullable=False),
    Column("digest", String(80), nullable=False),
)

datasets = Table(
    "datasets", metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # file | tabular
    Column("definition", Text, nullable=False),  # JSON: paths, format, options, transforms
    Column("definition_digest", String(80), nullable=False),
    Column("content_digest", String(80), nullable=False),
    Column("file_count", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("description", Text, nullable=True),
    Column("tags", Text, nullable=False),  # JSON
    Column("created_at", Float, nullable=False),
    Index("ix_datasets_name_version", "name", "version", unique=True),
)

environments = Table(
    "environments", metadata,
    Column("name", String(255), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", Text, nullable=False),  # JSON: what Environment.to_definition() gives
    Column("spec_digest", String(80), nullable=False),
    Column("created_at", Float, nullable=False),
)

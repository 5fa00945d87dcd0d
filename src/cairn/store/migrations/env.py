"""Alembic environment: the engine comes from Store.migrate (no alembic.ini needed)."""

from alembic import context

from cairn.store.schema import LEASE_OWNER_WHERE, metadata, runs

# what schema.py leaves out so that importing it stays light (see the index there)
for index in runs.indexes:
    if index.name == "ix_runs_lease_owner":
        index.dialect_kwargs["postgresql_where"] = LEASE_OWNER_WHERE

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # `alembic revision --autogenerate` during development
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url"))

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()

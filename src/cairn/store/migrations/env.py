"""Alembic environment: the engine comes from Store.migrate (no alembic.ini needed)."""

from alembic import context

from cairn.store.schema import metadata

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # `alembic revision --autogenerate` during development
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url"))

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()

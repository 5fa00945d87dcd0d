"""cache entries record the step's definition (its fingerprint without its inputs)

A step whose upstream output is still being digested may start at once only when no step of its
definition was ever cached (then no input digest could make it reusable): this column answers that.

Revision ID: 0006
Revises: 0005
"""
import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _definition(parts_json: str | None) -> str | None:
    """``cairn.engine.fingerprint.definition_of``, frozen as it was when this revision was written."""
    if not parts_json:
        return None
    try:
        parts = json.loads(parts_json)
    except ValueError:
        return None
    kept = {k: v for k, v in parts.items() if not k.startswith("input:")}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return "blake2b:" + hashlib.blake2b(text, digest_size=32).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("cache_entries") as batch:
        batch.add_column(sa.Column("definition", sa.String(length=80), nullable=True))
    op.create_index("ix_cache_entries_definition", "cache_entries", ["definition"])
    # entries made before: their definitions from the parts their step runs kept
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT c.fingerprint, r.fingerprint_parts FROM cache_entries c "
                                "JOIN runs r ON r.id = c.step_run_id")).fetchall()
    updates = [{"d": d, "f": fp} for fp, parts in rows if (d := _definition(parts))]
    if updates:
        conn.execute(sa.text("UPDATE cache_entries SET definition = :d WHERE fingerprint = :f"), updates)


def downgrade() -> None:
    op.drop_index("ix_cache_entries_definition", table_name="cache_entries")
    with op.batch_alter_table("cache_entries") as batch:
        batch.drop_column("definition")

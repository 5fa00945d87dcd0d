"""an index of the runs that hold a lease (the agent reads their owners at every claim)

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # partial: only the few active runs hold a lease; without it every claim scanned the whole history
    where = sa.text("lease_owner IS NOT NULL")
    op.create_index("ix_runs_lease_owner", "runs", ["lease_owner"], sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    op.drop_index("ix_runs_lease_owner", table_name="runs")

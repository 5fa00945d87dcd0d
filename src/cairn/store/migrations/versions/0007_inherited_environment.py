"""step runs name the record of the variables they inherited from their agent

``cairn debug`` recreates a step with them (``cairn.runner.inherited``).

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("inherited_env", sa.String(length=40), nullable=True))  # no table copy


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("inherited_env")

"""step outputs record a stat signature, checked before they are reused

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("step_outputs") as batch:
        batch.add_column(sa.Column("stat_signature", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("step_outputs") as batch:
        batch.drop_column("stat_signature")

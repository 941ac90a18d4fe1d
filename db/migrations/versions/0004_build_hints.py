"""The scheduler hints of the builds the API cell has not placed yet.

* build_hints: one row per instance created with hints (``target_cell``),
  removed once its build ends, so a build resumed after a restart keeps them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "build_hints",
        sa.Column("instance_uuid", sa.String(36), nullable=False),
        sa.Column("hints", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_uuid"],
            ["instances.uuid"],
            ondelete="CASCADE",
            name=op.f("fk_build_hints_instance_uuid_instances"),
        ),
        sa.PrimaryKeyConstraint("instance_uuid", name=op.f("pk_build_hints")),
    )


def downgrade() -> None:
    op.drop_table("build_hints")

"""Per-project quotas, and the orphan copies the API cell has still to delete.

* quotas: one row per (project, resource) whose limit differs from ``[quota]``.
* orphans: one row per (instance, cell) holding a copy the index does not hold
  there, kept until that cell acknowledges its delete.
* held_rows: outbox rows a parent refused, kept aside with the reason.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from zcells.db.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("resource", sa.String(16), nullable=False),
        sa.Column("hard_limit", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project", "resource", name=op.f("pk_quotas")),
    )
    op.create_table(
        "orphans",
        sa.Column("instance_uuid", sa.String(36), nullable=False),
        sa.Column("cell_name", sa.String(1024), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("instance_uuid", "cell_name", name=op.f("pk_orphans")),
    )

    op.create_table(
        "held_rows",
        sa.Column("parent_name", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False),
        sa.Column("held_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("parent_name", "seq", name=op.f("pk_held_rows")),
    )


def downgrade() -> None:
    op.drop_table("held_rows")
    op.drop_table("orphans")
    op.drop_table("quotas")

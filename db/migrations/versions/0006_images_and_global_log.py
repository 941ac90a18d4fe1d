"""Images, and the global log that sends flavors and images down the tree.

* images: one row per image, its properties a JSON map of text to text.
* global_log: the newest change of each flavor and image, under the API
  cell's sequence number (the ``global`` counter), one row per (kind, name).
* A cell with no parent (an API cell) logs the flavors it has already, so
  they flow down like the ones made after the upgrade. A cell with a parent
  logs nothing: its flavors and images come from above.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-15
"""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped]
import sqlalchemy as sa
from alembic import op
from zcells.db.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("name", name=op.f("uq_images_name")),
    )
    log = op.create_table(
        "global_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_global_log")),
        sa.UniqueConstraint("kind", "name", name=op.f("uq_global_log_kind_name")),
    )
    _log_flavors_of_a_top_cell(log)


def _log_flavors_of_a_top_cell(log: sa.Table) -> None:
    conn = op.get_bind()
    if conn.scalar(sa.text("SELECT COUNT(*) FROM cells WHERE kind = 'parent'")):
        return
    table = sa.table(
        "flavors",
        sa.column("id", sa.Integer()),
        sa.column("name", sa.String()),
        sa.column("memory_mb", sa.Integer()),
        sa.column("disk_gb", sa.Integer()),
        sa.column("vcpus", sa.Integer()),
        sa.column("created_at", UTCDateTime()),
    )
    flavors = conn.execute(sa.select(table).order_by(table.c.id)).all()
    if not flavors:
        return
    op.bulk_insert(
        log,
        [
            {
                "seq": seq,
                "kind": "flavor",
                "name": row.name,
                "deleted": False,
                "payload": msgpack.packb(
                    {
                        "name": row.name,
                        "memory_mb": row.memory_mb,
                        "disk_gb": row.disk_gb,
                        "vcpus": row.vcpus,
                    },
                    use_bin_type=True,
                ),
                "created_at": row.created_at,
            }
            for seq, row in enumerate(flavors, start=1)
        ],
    )
    op.execute(
        sa.text("INSERT INTO counters (name, value) VALUES ('global', :n)").bindparams(
            n=len(flavors)
        )
    )


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name = 'global'")
    op.drop_table("global_log")
    op.drop_table("images")

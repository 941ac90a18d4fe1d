"""The latest fault on the instance row, faults once per version, the outbox counter.

* instances: ``fault_code``, ``fault_message``, ``fault_cell`` (the latest
  fault) and an index on (created_at, uuid), the listing order.
* instance_faults: ``version`` (filled from the instance for existing rows),
  unique with the instance; ``cell_name`` may be null (a fault the API cell
  gave before any cell took the instance).
* counters: the ``outbox`` counter, seeded with the highest seq in use. The
  outbox seq is taken from it in the writing transaction, so on PostgreSQL the
  column's own sequence (which skips values on rollback and hands them out in
  start order, not commit order) is dropped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("fault_code", sa.String(64), nullable=True))
        batch.add_column(sa.Column("fault_message", sa.Text(), nullable=True))
        batch.add_column(sa.Column("fault_cell", sa.String(1024), nullable=True))
    op.create_index("ix_instances_created_at_uuid", "instances", ["created_at", "uuid"])

    with op.batch_alter_table("instance_faults") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE instance_faults SET version = (SELECT instances.version FROM instances "
        "WHERE instances.uuid = instance_faults.instance_uuid)"
    )
    with op.batch_alter_table("instance_faults") as batch:
        batch.alter_column("version", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("cell_name", existing_type=sa.String(1024), nullable=True)
        batch.create_unique_constraint(
            op.f("uq_instance_faults_instance_uuid_version"), ["instance_uuid", "version"]
        )

    op.create_table(
        "counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.execute(
        "INSERT INTO counters (name, value) SELECT 'outbox', COALESCE(MAX(seq), 0) FROM outbox"
    )
    if op.get_bind().dialect.name == "postgresql":
        # the BIGSERIAL sequence PostgreSQL made for outbox.seq in 0002
        op.execute("ALTER TABLE outbox ALTER COLUMN seq DROP DEFAULT")
        op.execute("DROP SEQUENCE IF EXISTS outbox_seq_seq")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE outbox_seq_seq OWNED BY outbox.seq")
        op.execute(
            "SELECT setval('outbox_seq_seq', GREATEST(value, 1), value > 0) "
            "FROM counters WHERE name = 'outbox'"
        )
        op.execute("ALTER TABLE outbox ALTER COLUMN seq SET DEFAULT nextval('outbox_seq_seq')")
    op.drop_table("counters")

    with op.batch_alter_table("instance_faults") as batch:
        batch.drop_constraint(op.f("uq_instance_faults_instance_uuid_version"), type_="unique")
        batch.drop_column("version")
    op.execute("UPDATE instance_faults SET cell_name = '' WHERE cell_name IS NULL")
    with op.batch_alter_table("instance_faults") as batch:
        batch.alter_column("cell_name", existing_type=sa.String(1024), nullable=False)

    op.drop_index("ix_instances_created_at_uuid", table_name="instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("fault_cell")
        batch.drop_column("fault_message")
        batch.drop_column("fault_code")

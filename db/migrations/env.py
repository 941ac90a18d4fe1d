"""Alembic environment: runs on the connection `zcells.db.migrate` hands over."""

from __future__ import annotations

from alembic import context
from zcells.db.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies tables
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

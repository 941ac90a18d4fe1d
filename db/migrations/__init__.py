"""Alembic migrations of a cell's database; run them with `zcells db sync`."""

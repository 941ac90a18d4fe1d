"""A cell's own database: models, migrations and queries. The only SQLAlchemy importer."""

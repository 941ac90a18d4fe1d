"""The zcells command line: typer commands and rich views. The only typer/rich importer."""

"""Numbered schema migrations (NNNN_name.sql): SQLite here, PostgreSQL in `postgres/`."""

"""The store: `make_store` picks the implementation the `db` setting names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.store.base import Store

if TYPE_CHECKING:
    from server.settings import Settings


def make_store(settings: Settings) -> Store:
    """PostgreSQL for a postgresql:// (or postgres://) URL, else the SQLite file `db_path`.
    Both check run revisions: the runtime passes the revision each decision was read at."""
    if settings.db_is_postgres:
        from server.store.postgres import PostgresStore  # asyncpg only when it is used

        return PostgresStore(settings.db or "", check_revs=True)
    from server.store.sqlite import SQLiteStore

    return SQLiteStore(settings.db_path, synchronous=settings.sqlite_sync, check_revs=True)

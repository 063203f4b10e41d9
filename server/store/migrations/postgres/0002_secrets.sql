-- Baton schema 2 (PostgreSQL): secrets that every replica must share, such as the
-- key that signs approval links (a link made by one replica is opened on another).
-- The first replica's value wins; the others read it.

CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

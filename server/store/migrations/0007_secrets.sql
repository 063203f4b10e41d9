-- Baton schema 7: secrets that every replica on one database must share, such as
-- the key that signs approval links (a link made by one replica is opened on
-- another). The first replica's value wins; the others read it.

CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

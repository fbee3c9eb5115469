"""The reader study's SQLite database: the key, readers, their orders and their answers.

One file, ``<reader.dir>/study.sqlite``, in WAL mode so many readers answer at once while the
admin exports. The key (each image's origin and class) lives only in ``images`` and no reader
endpoint selects from it. Readers see opaque ``items``: one per showing of an image (an image
shown twice for intra-reader agreement has two items). Tokens are stored as SHA-256 hashes (they
are 256-bit random, so a hash is enough); the link a reader gets holds the token in the URL
fragment, which browsers never send to a server or in a Referer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies(
    name TEXT PRIMARY KEY, question TEXT NOT NULL, classes TEXT NOT NULL, greyscale INTEGER NOT NULL,
    seed INTEGER NOT NULL, settings TEXT NOT NULL, built_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images(            -- the key: never read by a reader endpoint
    image_id INTEGER PRIMARY KEY, study TEXT NOT NULL REFERENCES studies(name),
    origin TEXT NOT NULL CHECK(origin IN ('real', 'synthetic')), truth TEXT NOT NULL,
    source_id TEXT NOT NULL, file TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS items(             -- what readers see: one opaque id per showing
    item_id TEXT PRIMARY KEY, study TEXT NOT NULL REFERENCES studies(name),
    image_id INTEGER NOT NULL REFERENCES images(image_id), showing INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readers(
    reader_id INTEGER PRIMARY KEY, study TEXT REFERENCES studies(name), name TEXT NOT NULL,
    role TEXT NOT NULL CHECK(role IN ('reader', 'admin')), token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL, submitted_at TEXT);
CREATE TABLE IF NOT EXISTS orders(            -- a deterministic shuffle of (study seed, reader id), stored
    reader_id INTEGER NOT NULL REFERENCES readers(reader_id), position INTEGER NOT NULL,
    item_id TEXT NOT NULL REFERENCES items(item_id), first_shown_at TEXT,
    PRIMARY KEY(reader_id, position), UNIQUE(reader_id, item_id));
CREATE TABLE IF NOT EXISTS answers(           -- one row per (reader, item): a double submit lands here
    reader_id INTEGER NOT NULL REFERENCES readers(reader_id), item_id TEXT NOT NULL REFERENCES items(item_id),
    answer TEXT NOT NULL, confidence INTEGER NOT NULL CHECK(confidence BETWEEN 1 AND 5),
    position INTEGER NOT NULL, first_shown_at TEXT, last_edit_at TEXT NOT NULL,
    active_ms INTEGER NOT NULL DEFAULT 0, revisions INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY(reader_id, item_id));
CREATE TABLE IF NOT EXISTS revisions(         -- append-only history of every answer given
    rev_id INTEGER PRIMARY KEY AUTOINCREMENT, reader_id INTEGER NOT NULL, item_id TEXT NOT NULL,
    answer TEXT NOT NULL, confidence INTEGER NOT NULL, at TEXT NOT NULL, active_ms INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS revisions_no_update BEFORE UPDATE ON revisions
    BEGIN SELECT RAISE(ABORT, 'revisions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS revisions_no_delete BEFORE DELETE ON revisions
    BEGIN SELECT RAISE(ABORT, 'revisions are append-only'); END;
"""


def db_path(reader_dir: str | Path) -> Path:
    return Path(reader_dir) / "study.sqlite"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def connect(reader_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    path = db_path(reader_dir)
    if not create and not path.is_file():
        raise FileNotFoundError(f"no reader study at {path}; run `medisyn reader build` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if create:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection):
    """``BEGIN IMMEDIATE`` … ``COMMIT``: writers queue on the database lock instead of deadlocking."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id() -> str:
    """An opaque id: 128 random bits, URL-safe, 22 characters (nothing about the image in it)."""
    return secrets.token_urlsafe(16)


ID_PATTERN = r"^[A-Za-z0-9_-]{22}$"


def reading_order(items: list[str], seed: int, study: str, reader_id: int) -> list[str]:
    """The reader's order: a shuffle seeded by (study seed, study name, reader id) of the study's
    items in id order, so two readers differ and a rebuilt order is the same."""
    rng = np.random.default_rng([seed, zlib.crc32(study.encode()), reader_id])
    base = sorted(items)
    return [base[i] for i in rng.permutation(len(base))]


def add_reader(conn: sqlite3.Connection, study: str | None, name: str, admin: bool = False) -> tuple[int, str]:
    """Create a reader of ``study`` (or an admin), store its order; returns (reader id, token)."""
    token = secrets.token_urlsafe(32)
    with transaction(conn):
        if not admin:
            row = conn.execute("SELECT seed FROM studies WHERE name = ?", (study,)).fetchone()
            if row is None:
                known = [r["name"] for r in conn.execute("SELECT name FROM studies ORDER BY name")]
                raise KeyError(f"no study {study!r} in this database; built: {', '.join(known) or 'none'}")
        cur = conn.execute(
            "INSERT INTO readers(study, name, role, token_hash, created_at) VALUES (?, ?, ?, ?, ?)",
            (None if admin else study, name, "admin" if admin else "reader", hash_token(token), now()),
        )
        reader_id = int(cur.lastrowid)
        if not admin:
            items = [r["item_id"] for r in conn.execute("SELECT item_id FROM items WHERE study = ?", (study,))]
            order = reading_order(items, int(row["seed"]), study, reader_id)
            conn.executemany(
                "INSERT INTO orders(reader_id, position, item_id) VALUES (?, ?, ?)",
                [(reader_id, pos, item) for pos, item in enumerate(order)],
            )
    return reader_id, token


def study_settings(conn: sqlite3.Connection, study: str) -> dict | None:
    row = conn.execute("SELECT settings FROM studies WHERE name = ?", (study,)).fetchone()
    return json.loads(row["settings"]) if row else None

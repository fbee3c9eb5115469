"""The reader study's SQLite database: the key, readers, their orders and their answers.

One file, ``<reader.dir>/study.sqlite``, in WAL mode so many readers answer at once while the
admin exports. The key (each image's origin and class) lives only in ``images`` and no reader
endpoint selects from it. Readers see opaque ``items``: one per showing of an image (an image
shown twice for intra-reader agreement has two items). Tokens are stored as SHA-256 hashes (they
are 256-bit random, so a hash is enough); the link a reader gets holds the token in the URL
fragment, which browsers never send to a server or in a Referer, but do keep in their history:
so a link works once (exchanged for a session, ``sessions``) and until ``link_expires_at``, and
``revoke``/``issue_link`` end a reader's link and sessions. The folder is 0700 and its files
0600: the key and real patient images are in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import zlib
from datetime import UTC, datetime, timedelta
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
    created_at TEXT NOT NULL, submitted_at TEXT,
    link_expires_at TEXT, link_used_at TEXT, revoked_at TEXT);  -- a reader's link: once, until it expires
CREATE TABLE IF NOT EXISTS sessions(          -- what a used link became: the browser's session cookie
    session_hash TEXT PRIMARY KEY, reader_id INTEGER NOT NULL REFERENCES readers(reader_id),
    created_at TEXT NOT NULL);
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
SCHEMA_VERSION = 2  # 1: the first release (tokens that never expire); 2: one-time links, sessions, revocation


def db_path(reader_dir: str | Path) -> Path:
    return Path(reader_dir) / "study.sqlite"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def private_dir(path: str | Path) -> Path:
    """Create (or tighten) a folder only its owner can enter: 0700."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: str | Path, data: bytes | str) -> Path:
    """Write a file only its owner can read (0600), an existing file's mode tightened too."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def connect(reader_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on, the
    schema migrated to ``SCHEMA_VERSION``. ``create`` makes the folder 0700 and the file 0600
    (SQLite gives its -wal and -shm files the database file's mode)."""
    path = db_path(reader_dir)
    if not create and not path.is_file():
        raise FileNotFoundError(f"no reader study at {path}; run `medisyn reader build` first")
    if create:
        private_dir(path.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # an empty file is a new database to SQLite
        path.chmod(0o600)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if create:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
    if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
        migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database of an earlier version up to ``SCHEMA_VERSION``. Version 1's readers keep
    their tokens: each link works once more (no expiry), then only as the session it became."""
    with transaction(conn):
        have = {r["name"] for r in conn.execute("PRAGMA table_info(readers)")}
        for column in ("link_expires_at", "link_used_at", "revoked_at"):
            if column not in have:
                conn.execute(f"ALTER TABLE readers ADD COLUMN {column} TEXT")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sessions(session_hash TEXT PRIMARY KEY, "
            "reader_id INTEGER NOT NULL REFERENCES readers(reader_id), created_at TEXT NOT NULL)"
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


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
    """An opaque id: 128 random bits, URL-safe, 22 characters (nothing about the image in it),
    beginning with a letter or digit (a leading '-' reads as a formula to a spreadsheet)."""
    while not (found := secrets.token_urlsafe(16))[0].isalnum():
        pass
    return found


ID_PATTERN = r"^[A-Za-z0-9_-]{22}$"


def reading_order(items: list[str], seed: int, study: str, reader_id: int) -> list[str]:
    """The reader's order: a shuffle seeded by (study seed, study name, reader id) of the study's
    items in id order, so two readers differ and a rebuilt order is the same."""
    rng = np.random.default_rng([seed, zlib.crc32(study.encode()), reader_id])
    base = sorted(items)
    return [base[i] for i in rng.permutation(len(base))]


def _expiry(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat(timespec="milliseconds")


def add_reader(
    conn: sqlite3.Connection, study: str | None, name: str, admin: bool = False, expiry_hours: float = 168.0
) -> tuple[int, str]:
    """Create a reader of ``study`` (or an admin), store its order; returns (reader id, token).
    A reader's token is their link's: it works once, within ``expiry_hours``; an admin's is a
    bearer token for the admin endpoints until revoked."""
    token = secrets.token_urlsafe(32)
    with transaction(conn):
        if not admin:
            row = conn.execute("SELECT seed FROM studies WHERE name = ?", (study,)).fetchone()
            if row is None:
                known = [r["name"] for r in conn.execute("SELECT name FROM studies ORDER BY name")]
                raise KeyError(f"no study {study!r} in this database; built: {', '.join(known) or 'none'}")
        cur = conn.execute(
            "INSERT INTO readers(study, name, role, token_hash, created_at, link_expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                None if admin else study,
                name,
                "admin" if admin else "reader",
                hash_token(token),
                now(),
                None if admin else _expiry(expiry_hours),
            ),
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


def find_reader(conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """The reader (or admin) a name, or failing that an id, names; KeyError when none or several."""
    rows = conn.execute("SELECT * FROM readers WHERE name = ? ORDER BY reader_id", (ref,)).fetchall()
    if not rows and ref.isdigit():
        rows = conn.execute("SELECT * FROM readers WHERE reader_id = ?", (int(ref),)).fetchall()
    if not rows:
        raise KeyError(f"no reader named {ref!r} (nor with that id)")
    if len(rows) > 1:
        ids = ", ".join(str(r["reader_id"]) for r in rows)
        raise KeyError(f"{len(rows)} readers are named {ref!r}; name one by its id ({ids})")
    return rows[0]


def revoke(conn: sqlite3.Connection, reader_id: int) -> None:
    """End a reader's link and every session it became (their answers stay)."""
    with transaction(conn):
        conn.execute("UPDATE readers SET revoked_at = ? WHERE reader_id = ?", (now(), reader_id))
        conn.execute("DELETE FROM sessions WHERE reader_id = ?", (reader_id,))


def reissue(conn: sqlite3.Connection, reader_id: int, expiry_hours: float = 168.0) -> str:
    """A new token for a reader (a lost, leaked or used-up link): the old token and sessions stop
    working, the reader keeps their order and answers. Returns the new token."""
    token = secrets.token_urlsafe(32)
    with transaction(conn):
        role = conn.execute("SELECT role FROM readers WHERE reader_id = ?", (reader_id,)).fetchone()["role"]
        conn.execute(
            "UPDATE readers SET token_hash = ?, link_used_at = NULL, revoked_at = NULL, link_expires_at = ? "
            "WHERE reader_id = ?",
            (hash_token(token), None if role == "admin" else _expiry(expiry_hours), reader_id),
        )
        conn.execute("DELETE FROM sessions WHERE reader_id = ?", (reader_id,))
    return token


def exchange(conn: sqlite3.Connection, token: str) -> str | None:
    """A reader's link token -> a new session token, once: the link is marked used in the same
    transaction, so two tabs racing get one session. None for a used, expired, revoked or unknown
    link (one answer for all: a caller learns nothing about which)."""
    session = secrets.token_urlsafe(32)
    at = now()
    with transaction(conn):
        cur = conn.execute(
            "UPDATE readers SET link_used_at = ? WHERE token_hash = ? AND role = 'reader' AND link_used_at IS NULL "
            "AND revoked_at IS NULL AND (link_expires_at IS NULL OR link_expires_at > ?)",
            (at, hash_token(token), at),
        )
        if cur.rowcount != 1:
            return None
        rid = conn.execute("SELECT reader_id FROM readers WHERE token_hash = ?", (hash_token(token),)).fetchone()[0]
        conn.execute(
            "INSERT INTO sessions(session_hash, reader_id, created_at) VALUES (?, ?, ?)", (hash_token(session), rid, at)
        )
    return session


def session_reader(conn: sqlite3.Connection, session: str) -> sqlite3.Row | None:
    """The reader a session cookie belongs to, unless they were revoked or reissued since."""
    return conn.execute(
        "SELECT r.* FROM sessions s JOIN readers r ON r.reader_id = s.reader_id "
        "WHERE s.session_hash = ? AND r.revoked_at IS NULL",
        (hash_token(session),),
    ).fetchone()


def admin_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    """The admin a bearer token belongs to (a reader's link token is no bearer token)."""
    return conn.execute(
        "SELECT * FROM readers WHERE token_hash = ? AND role = 'admin' AND revoked_at IS NULL", (hash_token(token),)
    ).fetchone()


def study_settings(conn: sqlite3.Connection, study: str) -> dict | None:
    row = conn.execute("SELECT settings FROM studies WHERE name = ?", (study,)).fetchone()
    return json.loads(row["settings"]) if row else None

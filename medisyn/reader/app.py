"""``medisyn reader serve``: the blinded reader web app (FastAPI over the study's SQLite file).

Blinding rules, each tested (tests/test_reader_app.py):
- no reader endpoint selects origin or truth; a reader sees opaque item ids, the study's
  question and classes, and their own answers;
- every image of a study is served with the same length and the same headers (no ETag, no
  Last-Modified: those would follow the file), in an order stored per reader;
- a token travels only in the ``Authorization`` header (the link carries it in the URL
  fragment, which no browser sends), pages send ``Referrer-Policy: no-referrer`` and a
  Content-Security-Policy that allows only this origin's script, style and blob images;
- readers cannot read the key, another reader's answers or admin endpoints (401 without a
  valid token, 403 for the wrong role); item ids outside the reader's study, path tricks and
  malformed bodies get 4xx before any file is opened, and a file path is only ever built from
  the database's own random names.
"""

import json
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from medisyn.reader import db
from medisyn.reader.study import MEDIA_TYPE

SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
STATIC = {"reader.js": "text/javascript", "reader.css": "text/css"}


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: str = Field(min_length=1, max_length=200)
    confidence: int = Field(ge=1, le=5)
    active_ms: int = Field(default=0, ge=0, le=86_400_000)  # time on the item since the last save


def create_app(reader_dir: str | Path) -> FastAPI:
    reader_dir = Path(reader_dir).resolve()
    images_dir = reader_dir / "images"
    db.connect(reader_dir).close()  # a missing study fails now, not on the first request
    app = FastAPI(title="MediSyn reader study", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers[k] = v
        return response

    def conn():
        c = db.connect(reader_dir)
        try:
            yield c
        finally:
            c.close()

    Conn = Annotated[sqlite3.Connection, Depends(conn)]

    def who(c: Conn, authorization: Annotated[str | None, Header()] = None) -> sqlite3.Row:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "a reader link's token is needed", headers={"WWW-Authenticate": "Bearer"})
        row = c.execute("SELECT * FROM readers WHERE token_hash = ?", (db.hash_token(token.strip()),)).fetchone()
        if row is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return row

    def reader(user: Annotated[sqlite3.Row, Depends(who)]) -> sqlite3.Row:
        if user["role"] != "reader":
            raise HTTPException(403, "this endpoint is for readers")
        return user

    def admin(user: Annotated[sqlite3.Row, Depends(who)]) -> sqlite3.Row:
        if user["role"] != "admin":
            raise HTTPException(403, "this endpoint is for the study's admin")
        return user

    Reader = Annotated[sqlite3.Row, Depends(reader)]
    Admin = Annotated[sqlite3.Row, Depends(admin)]
    ItemId = Annotated[str, PathParam(pattern=db.ID_PATTERN)]

    def position_of(c, r, item_id: str) -> int:
        row = c.execute(
            "SELECT position FROM orders WHERE reader_id = ? AND item_id = ?", (r["reader_id"], item_id)
        ).fetchone()
        if row is None:
            raise HTTPException(404, "no such item in your study")
        return int(row["position"])

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # browsers ask; an empty answer, not a 404 in the console

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "not found")
        return Response(_static(name), media_type=STATIC[name])

    @app.get("/api/session")
    def session(c: Conn, r: Reader) -> dict:
        study = c.execute(
            "SELECT name, question, classes, greyscale FROM studies WHERE name = ?", (r["study"],)
        ).fetchone()
        total = c.execute("SELECT COUNT(*) FROM orders WHERE reader_id = ?", (r["reader_id"],)).fetchone()[0]
        answered = c.execute(
            "SELECT o.position FROM orders o JOIN answers a ON a.reader_id = o.reader_id AND a.item_id = o.item_id "
            "WHERE o.reader_id = ? ORDER BY o.position",
            (r["reader_id"],),
        ).fetchall()
        done = {row["position"] for row in answered}
        resume = next((p for p in range(total) if p not in done), total - 1)
        return {
            "reader": r["name"],
            "study": study["name"],
            "question": study["question"],
            "classes": json.loads(study["classes"]),
            "greyscale": bool(study["greyscale"]),
            "items": total,
            "answered": len(done),
            "resume_at": resume,
            "submitted": r["submitted_at"] is not None,
        }

    @app.get("/api/items/{position}")
    def item(position: int, c: Conn, r: Reader) -> dict:
        """The item at a position of the reader's order, with the reader's own answer if any;
        the first call records when it was first shown."""
        row = c.execute(
            "SELECT item_id FROM orders WHERE reader_id = ? AND position = ?", (r["reader_id"], position)
        ).fetchone()
        if row is None:
            raise HTTPException(404, "no item at this position")
        with db.transaction(c):
            c.execute(
                "UPDATE orders SET first_shown_at = ? WHERE reader_id = ? AND position = ? AND first_shown_at IS NULL",
                (db.now(), r["reader_id"], position),
            )
        ans = c.execute(
            "SELECT answer, confidence FROM answers WHERE reader_id = ? AND item_id = ?",
            (r["reader_id"], row["item_id"]),
        ).fetchone()
        return {
            "position": position,
            "item": row["item_id"],
            "answer": ans["answer"] if ans else None,
            "confidence": ans["confidence"] if ans else None,
        }

    @app.get("/api/images/{item_id}")
    def image(item_id: ItemId, c: Conn, r: Reader) -> Response:
        position_of(c, r, item_id)  # 404 unless the item is in this reader's order
        row = c.execute(
            "SELECT i.file FROM items t JOIN images i ON i.image_id = t.image_id WHERE t.item_id = ?", (item_id,)
        ).fetchone()
        return Response((images_dir / f"{row['file']}.bmp").read_bytes(), media_type=MEDIA_TYPE)

    @app.put("/api/answers/{item_id}")
    def answer(item_id: ItemId, body: Answer, c: Conn, r: Reader) -> dict:
        """Create or change the reader's answer to an item (one row per reader and item; every
        change is appended to the revision history). Refused once the study is submitted."""
        classes = json.loads(
            c.execute("SELECT classes FROM studies WHERE name = ?", (r["study"],)).fetchone()["classes"]
        )
        if body.answer not in classes:
            raise HTTPException(422, "answer must be one of the study's classes")
        position = position_of(c, r, item_id)
        at = db.now()
        with db.transaction(c):
            submitted = c.execute("SELECT submitted_at FROM readers WHERE reader_id = ?", (r["reader_id"],)).fetchone()[
                0
            ]
            if submitted:
                raise HTTPException(409, "the study is submitted; answers can no longer change")
            shown = c.execute(
                "SELECT first_shown_at FROM orders WHERE reader_id = ? AND item_id = ?", (r["reader_id"], item_id)
            ).fetchone()[0]
            c.execute(
                "INSERT INTO answers(reader_id, item_id, answer, confidence, position, first_shown_at, last_edit_at, "
                "active_ms) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(reader_id, item_id) DO UPDATE SET "
                "answer = excluded.answer, confidence = excluded.confidence, last_edit_at = excluded.last_edit_at, "
                "active_ms = answers.active_ms + excluded.active_ms, revisions = answers.revisions + 1",
                (r["reader_id"], item_id, body.answer, body.confidence, position, shown, at, body.active_ms),
            )
            c.execute(
                "INSERT INTO revisions(reader_id, item_id, answer, confidence, at, active_ms) VALUES (?,?,?,?,?,?)",
                (r["reader_id"], item_id, body.answer, body.confidence, at, body.active_ms),
            )
            answered = c.execute("SELECT COUNT(*) FROM answers WHERE reader_id = ?", (r["reader_id"],)).fetchone()[0]
        return {"saved": True, "answered": answered}

    @app.post("/api/submit")
    def submit(c: Conn, r: Reader) -> dict:
        """Close the reader's study: every item must have an answer; afterwards nothing changes."""
        with db.transaction(c):
            total = c.execute("SELECT COUNT(*) FROM orders WHERE reader_id = ?", (r["reader_id"],)).fetchone()[0]
            answered = c.execute("SELECT COUNT(*) FROM answers WHERE reader_id = ?", (r["reader_id"],)).fetchone()[0]
            if answered < total:
                raise HTTPException(409, f"{total - answered} of {total} images have no answer yet")
            c.execute(
                "UPDATE readers SET submitted_at = COALESCE(submitted_at, ?) WHERE reader_id = ?",
                (db.now(), r["reader_id"]),
            )
        return {"submitted": True}

    @app.get("/api/admin/progress")
    def progress(c: Conn, _: Admin) -> list[dict]:
        rows = c.execute(
            "SELECT r.reader_id, r.name, r.study, r.submitted_at, "
            "(SELECT COUNT(*) FROM orders o WHERE o.reader_id = r.reader_id) AS items, "
            "(SELECT COUNT(*) FROM answers a WHERE a.reader_id = r.reader_id) AS answered "
            "FROM readers r WHERE r.role = 'reader' ORDER BY r.reader_id"
        ).fetchall()
        return [dict(row) for row in rows]

    @app.get("/api/admin/answers.csv")
    def answers_csv(c: Conn, _: Admin) -> Response:
        from medisyn.reader.analysis import answers_frame

        return Response(answers_frame(c).to_csv(index=False), media_type="text/csv; charset=utf-8")

    return app


def _static(name: str) -> bytes:
    return resources.files("medisyn.reader").joinpath("static", name).read_bytes()


def serve(reader_dir: str | Path, host: str, port: int) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"reader: serving on {host}:{port} without TLS; put a TLS proxy in front (README: Reader study)")
    uvicorn.run(create_app(reader_dir), host=host, port=port, access_log=False, server_header=False)

"""``medisyn reader serve``: the blinded reader web app (FastAPI over the study's SQLite file).

Blinding rules, each tested (tests/test_reader_app.py):
- no reader endpoint selects origin or truth; a reader sees opaque item ids, the study's
  question and classes, and their own answers;
- every image of a study is served with the same length and the same headers (no ETag, no
  Last-Modified: those would follow the file), in an order stored per reader;
- a reader's link carries a one-time token in the URL fragment (no browser sends it, but
  browsers do write it to their history before the page can remove it): the page POSTs it once
  in the ``Authorization`` header to ``/api/session``, which marks the link used and sets an
  HttpOnly, SameSite=Strict session cookie, so a link found in a history later opens nothing;
  admins send their token as ``Authorization: Bearer``; pages send ``Referrer-Policy:
  no-referrer`` and a Content-Security-Policy that allows only this origin's script, style and
  blob images;
- readers cannot read the key, another reader's answers or admin endpoints (401 without a
  valid credential, 403 for the wrong role); item ids outside the reader's study, path tricks and
  malformed bodies get 4xx before any file is opened, and a file path is only ever built from
  the database's own random names;
- a request body is refused (401) before it is read when the credential is missing or wrong,
  and (413) when it is longer than ``MAX_BODY``; every reply, errors and 500s included, carries
  the same security headers, and no error echoes its input or a traceback.
"""

import json
import logging
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from medisyn.reader import db
from medisyn.reader.study import MEDIA_TYPE, vary

log = logging.getLogger("medisyn.reader")

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
SESSION_COOKIE = "medisyn_session"
MAX_BODY = 4096  # bytes: an answer is under 300; anything longer is refused unread (413)
MAX_POSITION = 2**31  # positions beyond any order are a 404, not an integer SQLite cannot hold
EXCHANGE = "/api/session"  # POST: a link's token -> a session cookie (authenticates itself)


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

    def identify(c: sqlite3.Connection, request: Request) -> sqlite3.Row | None:
        """The session cookie's reader, else the bearer token's admin, else None."""
        session = request.cookies.get(SESSION_COOKIE)
        row = db.session_reader(c, session) if session else None
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if row is None and scheme.lower() == "bearer" and token.strip():
            row = db.admin_by_token(c, token.strip())
        return row

    def identify_now(request: Request) -> sqlite3.Row | None:
        c = db.connect(reader_dir)
        try:
            return identify(c, request)
        finally:
            c.close()

    def unauthorized() -> JSONResponse:
        return JSONResponse(
            {"detail": "open your reader link again, or ask the study's admin for a new one"},
            401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def checked(request: Request, call_next):
        """Credential first, then length, and only then is the body read (by the endpoint)."""
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            if request.url.path != EXCHANGE and await run_in_threadpool(identify_now, request) is None:
                return unauthorized()
            length = request.headers.get("content-length")
            if length is None and "transfer-encoding" in request.headers:
                return JSONResponse({"detail": "a request body needs a Content-Length"}, 411)
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                return JSONResponse({"detail": f"a request body is at most {MAX_BODY} bytes"}, 413)
        return await call_next(request)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            response = await checked(request, call_next)
        except Exception as exc:  # noqa: BLE001 - a 500 with the same headers as every reply, no traceback
            route = getattr(request.scope.get("route"), "path", "?")  # the template: no id or value of the request
            log.error("reader: %s answering %s %s", type(exc).__name__, request.method, route)
            response = JSONResponse({"detail": "internal error"}, 500)
        for k, v in SECURITY_HEADERS.items():
            response.headers[k] = v
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming where and what, never the input (a NaN cannot be written as JSON, and a
        reply should not echo what it was sent)."""
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, 422)

    def conn():
        c = db.connect(reader_dir)
        try:
            yield c
        finally:
            c.close()

    Conn = Annotated[sqlite3.Connection, Depends(conn)]

    def who(c: Conn, request: Request) -> sqlite3.Row:
        row = identify(c, request)
        if row is None:
            raise HTTPException(
                401,
                "open your reader link again, or ask the study's admin for a new one",
                headers={"WWW-Authenticate": "Bearer"},
            )
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

    @app.post(EXCHANGE)
    def exchange(
        request: Request, response: Response, c: Conn, authorization: Annotated[str | None, Header()] = None
    ) -> dict:
        """A reader's link token (``Authorization: Bearer``), once, for a session cookie: the link
        is used up, so the copy a browser's history keeps opens nothing. HttpOnly (no script reads
        it), SameSite=Strict (no other site's request carries it), Secure over https (a TLS proxy
        that sets X-Forwarded-Proto), and no Max-Age: it ends with the browser session."""
        scheme, _, token = (authorization or "").partition(" ")
        session = db.exchange(c, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if session is None and (user := identify(c, request)) is not None and user["role"] == "reader":
            return {"session": True}  # a reader back through their used link, in the browser that used it
        if session is None:
            raise HTTPException(
                401,
                "this link is used, expired or revoked; ask the study's admin for a new one",
                headers={"WWW-Authenticate": "Bearer"},
            )
        response.set_cookie(
            SESSION_COOKIE,
            session,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return {"session": True}

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
        row = None
        if 0 <= position <= MAX_POSITION:
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
        """The showing's bytes: the image with this showing's own imperceptible noise (``vary``),
        so two showings of one image hash apart. None once the reader has submitted."""
        position_of(c, r, item_id)  # 404 unless the item is in this reader's order
        if r["submitted_at"] is not None:
            raise HTTPException(403, "the study is submitted; its images are no longer shown")
        row = c.execute(
            "SELECT i.file FROM items t JOIN images i ON i.image_id = t.image_id WHERE t.item_id = ?", (item_id,)
        ).fetchone()
        data = (images_dir / f"{row['file']}.bmp").read_bytes()
        return Response(vary(data, f"{row['file']}:{item_id}"), media_type=MEDIA_TYPE)

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
        from medisyn.reader.analysis import answers_frame, csv_text

        return Response(csv_text(answers_frame(c)), media_type="text/csv; charset=utf-8")

    return app


def _static(name: str) -> bytes:
    return resources.files("medisyn.reader").joinpath("static", name).read_bytes()


def serve(reader_dir: str | Path, host: str, port: int) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"reader: serving on {host}:{port} without TLS; put a TLS proxy in front (README: Reader study)")
    uvicorn.run(create_app(reader_dir), host=host, port=port, access_log=False, server_header=False)

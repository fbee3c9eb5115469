"""A reader in a real browser: Playwright driving Debian's Chromium, headless, against the app
served by uvicorn on 127.0.0.1. The reader opens their link, zooms, pans and windows an image,
answers, leaves, comes back to where they stopped, answers the rest and submits; the export
then holds exactly their answers. The browser keeps a persistent profile, as a clinical
workstation's does: the link it writes to its History opens nothing afterwards. `make test`
installs Chromium when it is missing."""

from __future__ import annotations

import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, READER_STUDIES, reader_run

from medisyn.reader import db
from medisyn.reader.analysis import export
from medisyn.reader.app import create_app
from medisyn.reader.study import run

pytestmark = pytest.mark.slow  # a real browser: `make test` runs it, `make test-fast` does not need Chromium


@pytest.fixture()
def served(tmp_path):
    import uvicorn

    cfg = reader_run(tmp_path, overrides=("reader.studies=[oct-condition]", "reader.image_size=64"))
    out = run(cfg)
    conn = db.connect(out)
    rid, token = db.add_reader(conn, "oct-condition", "Browser reader")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(out), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield out, conn, rid, f"http://127.0.0.1:{sock.getsockname()[1]}/#t={token}", tmp_path / "profile"
    server.should_exit = True
    thread.join(timeout=10)


def test_a_reader_answers_every_image_leaves_resumes_and_submits(served):
    from playwright import sync_api

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: `make browser` installs it (`make test` runs it first)")
    out, conn, rid, link, profile = served
    classes = READER_STUDIES["oct-condition"][3]
    chosen: dict[str, tuple[str, int]] = {}
    problems: list[str] = []

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 900}
        )
        page = browser.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))

        def answer(k: int) -> None:
            item = page.locator("#canvas").get_attribute("data-item")
            cls, conf = classes[k % 3], 1 + k % 5
            page.check(f'input[name="class"][value="{cls}"]')
            page.check(f'input[name="confidence"][value="{conf}"]')
            chosen[item] = (cls, conf)
            before = page.locator("#canvas").get_attribute("data-position")
            page.click("#next")
            if int(before) < 14:
                page.wait_for_selector(f'#canvas[data-position="{int(before) + 1}"]')
            else:
                sync_api.expect(page.locator("#status")).to_have_text("Saved.")

        page.goto(link)
        page.wait_for_selector("body[data-ready=true]")
        assert "#t=" not in page.url  # the token left the address bar
        canvas = page.locator("#canvas")
        assert page.locator("#wl").is_visible()  # a grey study gets window/level

        # zoom (button and wheel), pan by dragging, window/level, then reset
        centre = (
            "(() => { const c = document.getElementById('canvas'); return Array.from(c.getContext('2d')"
            ".getImageData(c.width / 2, c.height / 2, 1, 1).data).join(','); })()"
        )
        start = page.evaluate(centre)
        page.click("#zoom-in")
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -200)
        assert float(canvas.get_attribute("data-scale")) > 1.25
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2 + 40, steps=4)
        page.mouse.up()
        assert canvas.get_attribute("data-tx") != "0" or canvas.get_attribute("data-ty") != "0"
        plain = page.evaluate(centre)
        page.fill("#window", "40")
        page.locator("#window").dispatch_event("input")
        page.fill("#level", "60")
        page.locator("#level").dispatch_event("input")
        assert canvas.get_attribute("data-window") == "40" and canvas.get_attribute("data-level") == "60"
        assert page.evaluate(centre) != plain  # the pixels changed with the window
        page.screenshot(path=str(out / "viewer.png"))
        page.click("#reset")
        assert canvas.get_attribute("data-scale") == "1.000" and canvas.get_attribute("data-window") == "255"
        assert page.evaluate(centre) == start

        for k in range(6):
            answer(k)
        page.goto("about:blank")  # the reader leaves ...
        page.goto(link)  # ... and opens their link again
        page.wait_for_selector("body[data-ready=true]")
        assert canvas.get_attribute("data-position") == "6"
        assert "6 answered" in page.locator("#progress").text_content()
        assert page.locator("#submit").is_disabled()
        for k in range(6, 15):
            answer(k)
        # go back and change one answer before submitting
        page.click("#prev")
        page.wait_for_selector('#canvas[data-position="13"]')
        item = canvas.get_attribute("data-item")
        assert page.locator(f'input[name="class"][value="{chosen[item][0]}"]').is_checked()
        page.check('input[name="class"][value="drusen"]')
        page.check('input[name="confidence"][value="5"]')
        chosen[item] = ("drusen", 5)
        page.click("#next")
        page.wait_for_selector('#canvas[data-position="14"]')
        page.click("#submit")
        page.wait_for_selector("body[data-submitted=true]")
        page.screenshot(path=str(out / "browser.png"))
        assert page.evaluate("sessionStorage.length + localStorage.length") == 0  # no credential a script can read
        browser.close()

        # the workstation's next user: the profile's History holds the link, which opens nothing now
        history = sqlite3.connect(profile / "Default" / "History")
        urls = [u for (u,) in history.execute("SELECT url FROM urls")]
        history.close()
        found = {t for u in urls for t in re.findall(r"#t=([A-Za-z0-9_-]+)", u)}
        assert any(u.startswith(link.split("#")[0]) for u in urls), urls  # the History was written
        assert found <= {link.split("#t=")[1]}, found
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(link)
        sync_api.expect(page.locator("#message")).to_contain_text("used up, expired or revoked")
        assert page.locator("#study").is_hidden()
        browser.close()

    assert not problems, problems
    assert all("#t=" not in u and "t=" not in u.split("?")[-1] for u in requests if "?" in u)
    answers = pd.read_csv(export(out)[0])
    mine = answers[answers["reader"] == rid]
    assert len(mine) == 15 and mine["submitted"].all()
    assert {r.item: (r.answer, r.confidence) for r in mine.itertuples()} == chosen
    assert (mine["revisions"] > 1).sum() == 1  # the one changed answer
    assert conn.execute("SELECT submitted_at FROM readers WHERE reader_id = ?", (rid,)).fetchone()[0]

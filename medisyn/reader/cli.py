"""``medisyn reader add-reader|revoke|reissue``: the credentials of a study, on its host.

A reader's link works once, within ``reader.link_expiry_hours``; ``reissue`` gives a reader a
new link (lost, leaked, used up, or a new browser) and ends the old one and its sessions, the
answers kept; ``revoke`` ends a reader's (or an admin's) access without a new one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medisyn.reader import db


def _link(args, cfg, reader_id: int, study: str, token: str) -> str:
    base = (args.base_url or f"http://{cfg.reader.host}:{cfg.reader.port}").rstrip("/")
    hours = cfg.reader.link_expiry_hours
    return (
        f"reader {reader_id} ({study}): {base}/#t={token}  (a secret link: it is shown once, opens the study "
        f"once, in one browser, and expires in {hours:g} h)"
    )


def links(args, cfg, folder: Path) -> int:
    """Run one of add-reader, revoke, reissue; 2 (with the reason on stderr) on a bad request."""
    action = args.action
    if action == "add-reader" and not args.admin and not args.study:
        print("medisyn: reader add-reader: name the study with --study (or --admin)", file=sys.stderr)
        return 2
    if action in ("revoke", "reissue") and not args.reader:
        print(f"medisyn: reader {action}: name the reader with --reader NAME (or its id)", file=sys.stderr)
        return 2
    conn = db.connect(folder)
    try:
        if action == "add-reader":
            name = args.name or ("admin" if args.admin else "")
            reader_id, token = db.add_reader(conn, args.study, name, args.admin, cfg.reader.link_expiry_hours)
            role, study = ("admin" if args.admin else "reader"), args.study
        else:
            row = db.find_reader(conn, args.reader)
            reader_id, role, study = int(row["reader_id"]), row["role"], row["study"]
            if action == "revoke":
                db.revoke(conn, reader_id)
                print(f"{role} {reader_id}: revoked (their link and sessions no longer work; answers are kept)")
                return 0
            token = db.reissue(conn, reader_id, cfg.reader.link_expiry_hours)
    except KeyError as exc:
        print(f"medisyn: reader {action}: {exc.args[0]}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    if role == "admin":
        print(f"admin {reader_id}: token {token}  (send it as 'Authorization: Bearer <token>'; it is shown once)")
    else:
        print(_link(args, cfg, reader_id, study, token))
    return 0

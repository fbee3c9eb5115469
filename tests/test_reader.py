"""Reader study: building a blinded study, reading orders, and the analysis numbers."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pandas as pd
import pytest
from conftest import READER_STUDIES, reader_run
from PIL import Image

from medisyn.config import load_config
from medisyn.configtools import ConfigError
from medisyn.reader import db
from medisyn.reader.analysis import analyze, bootstrap_difference, csv_safe, export, fleiss, summarize
from medisyn.reader.config import load_studies
from medisyn.reader.study import reader_dir, run


@pytest.fixture()
def built(tmp_path):
    cfg = reader_run(tmp_path)
    out = run(cfg)
    return cfg, out


def test_build_balances_origins_and_classes_and_draws_only_eligible_images(built):
    cfg, out = built
    conn = db.connect(out)
    for name, (source, _, _, classes, _) in READER_STUDIES.items():
        images = [dict(r) for r in conn.execute("SELECT * FROM images WHERE study = ?", (name,))]
        assert len(images) == 12
        for origin in ("real", "synthetic"):
            counts = {c: sum(1 for i in images if i["origin"] == origin and i["truth"] == c) for c in classes}
            assert counts == dict.fromkeys(classes, 2), (name, origin, counts)
        real_ids = {i["source_id"] for i in images if i["origin"] == "real"}
        corpus = pd.read_parquet(cfg.run_path / "corpus" / "c-0.parquet", columns=["id", "split", "source", "labels"])
        picked = corpus[corpus["id"].isin(real_ids)]
        assert set(picked["split"]) == {"test"} and set(picked["source"]) == {source}
        assert all(len(labels) == 1 and labels[0] in classes for labels in picked["labels"])
        items = conn.execute("SELECT showing, COUNT(*) FROM items WHERE study = ? GROUP BY showing", (name,)).fetchall()
        assert dict(map(tuple, items)) == {1: 12, 2: 3}  # repeat_fraction 0.25 of 12


def test_every_served_file_of_a_study_has_one_length_header_mode_and_no_metadata(built):
    cfg, out = built
    conn = db.connect(out)
    for name, (*_, grey) in READER_STUDIES.items():
        files = [r["file"] for r in conn.execute("SELECT file FROM images WHERE study = ?", (name,))]
        blobs = [(out / "images" / f"{f}.bmp").read_bytes() for f in files]
        assert len({len(b) for b in blobs}) == 1
        assert len({b[:54] for b in blobs}) == 1  # BMP file + info header: identical
        assert len({(out / "images" / f"{f}.bmp").stat().st_mtime for f in files}) == 1
        for b in blobs:
            im = Image.open(io.BytesIO(b))
            assert im.format == "BMP" and im.size == (48, 48) and im.mode == ("L" if grey else "RGB")
            assert not im.info.get("exif") and not im.info.get("icc_profile")


def test_rebuild_is_a_no_op_a_changed_study_without_readers_is_rebuilt_and_with_readers_refused(tmp_path):
    cfg = reader_run(tmp_path)
    out = run(cfg)
    conn = db.connect(out)
    before = {r["item_id"] for r in conn.execute("SELECT item_id FROM items")}
    run(cfg)
    assert {r["item_id"] for r in conn.execute("SELECT item_id FROM items")} == before
    smaller = reader_run(tmp_path, overrides=("reader.images_per_study=6", "reader.studies=[oct-condition]"))
    run(smaller)
    assert conn.execute("SELECT COUNT(*) FROM images WHERE study = 'oct-condition'").fetchone()[0] == 6
    assert len(list((out / "images").iterdir())) == 12 + 6  # the old files went with the old study
    db.add_reader(conn, "oct-condition", "A")
    with pytest.raises(ConfigError, match=r"oct-condition.*1 readers.*images_per_study"):
        run(reader_run(tmp_path, overrides=("reader.studies=[oct-condition]",)))


def test_too_few_images_names_the_study_class_and_counts(tmp_path):
    cfg = reader_run(tmp_path, overrides=("reader.images_per_study=30",))
    with pytest.raises(
        ConfigError, match=r"cholecystectomy-phase.*Calot's triangle dissection.*has 4 real test.*needs 5"
    ):
        run(cfg)


def test_real_splits_option_draws_the_real_half_from_the_named_splits(tmp_path):
    cfg = reader_run(tmp_path, overrides=("reader.images_per_study=6", "reader.real_splits=[train]"))
    out = run(cfg)
    conn = db.connect(out)
    ids = [r["source_id"] for r in conn.execute("SELECT source_id FROM images WHERE origin = 'real'")]
    corpus = pd.read_parquet(cfg.run_path / "corpus" / "c-0.parquet", columns=["id", "split"])
    assert corpus[corpus["id"].isin(ids)]["split"].value_counts().to_dict() == {"train": 6}  # 1 per class
    with pytest.raises(ConfigError, match="reader.real_splits"):
        reader_run(tmp_path, overrides=("reader.real_splits=[holdout]",))


def test_missing_synthetic_set_and_bad_study_files(tmp_path):
    cfg = reader_run(tmp_path, overrides=("reader.studies=[oct-condition]",))
    (cfg.run_path / "synthetic" / "reader" / "manifest.parquet").unlink()
    with pytest.raises(ConfigError, match=r"synthetic set 'reader' has no manifest.*generate.sets=\[reader\]"):
        run(cfg)
    bad = tmp_path / "s.yaml"
    bad.write_text("studies:\n  - {name: x, specialty: surgery, image_type: endoscopy, classes: [a, b], color: red}\n")
    with pytest.raises(ConfigError, match=r"studies\[0\]: unknown key 'color'"):
        load_studies(str(bad))
    with pytest.raises(ConfigError, match=r"reader.studies: unknown study 'nope'"):
        load_studies("paper", ("nope",))
    with pytest.raises(ConfigError, match="must be even"):
        reader_run(tmp_path, overrides=("reader.images_per_study=7",))
    with pytest.raises(ConfigError, match="reader.dir.*needs a local disk"):
        reader_run(tmp_path, overrides=("reader.dir=s3://bucket/reader",))


def test_paper_studies_are_the_papers():
    studies = {s.name: s for s in load_studies("paper")}
    assert studies["cholecystectomy-phase"].classes == (
        "Calot's triangle dissection",
        "clipping and cutting",
        "cleaning and coagulation",
    )
    assert studies["oct-condition"].classes == ("normal findings", "drusen", "diabetic macular edema")


def test_orders_differ_between_readers_and_are_stored_deterministically(built):
    cfg, out = built
    conn = db.connect(out)
    a, _ = db.add_reader(conn, "oct-condition", "A")
    b, _ = db.add_reader(conn, "oct-condition", "B")

    def order(r):
        return [
            x["item_id"] for x in conn.execute("SELECT item_id FROM orders WHERE reader_id = ? ORDER BY position", (r,))
        ]

    items = sorted(r["item_id"] for r in conn.execute("SELECT item_id FROM items WHERE study = 'oct-condition'"))
    assert sorted(order(a)) == sorted(order(b)) == items
    assert order(a) != order(b)
    assert order(a) == db.reading_order(items, cfg.seed, "oct-condition", a)  # a pure function of (seed, reader)


def _answers(correct_real: list[int], n_real: int = 51, n_syn: int = 51, classes=("a", "b", "c")) -> pd.DataFrame:
    """A hand-made study: reader k answers correctly the first ``correct_real[k]`` real cases and
    every synthetic case; wrong answers name the next class."""
    rows = []
    for k, n_ok in enumerate(correct_real):
        for case in range(n_real + n_syn):
            origin = "real" if case < n_real else "synthetic"
            truth = classes[case % 3]
            ok = case >= n_real or case < n_ok
            rows.append(
                {
                    "study": "s",
                    "reader": k + 1,
                    "reader_name": f"R{k + 1}",
                    "submitted": True,
                    "item": f"i{case}",
                    "image": case,
                    "showing": 1,
                    "origin": origin,
                    "truth": truth,
                    "answer": truth if ok else classes[(case + 1) % 3],
                    "correct": ok,
                    "confidence": 4 if origin == "real" else 5,
                    "position": (case * 7 + k) % (n_real + n_syn),
                }
            )
    return pd.DataFrame(rows)


def test_analysis_numbers_on_a_hand_made_answer_set():
    # 41, 43 and 44 of 51 real images right: the paper's surgeons' 83.66 ± 3.00% (sample sd)
    frame = _answers([41, 43, 44])
    s = summarize(frame, ["a", "b", "c"], n_resamples=500)
    real, syn = s["across_readers"]["real"], s["across_readers"]["synthetic"]
    assert round(100 * real["accuracy"]["mean"], 2) == 83.66 and round(100 * real["accuracy"]["sd"], 2) == 3.00
    assert syn["accuracy"]["mean"] == 1.0 and syn["accuracy"]["sd"] == 0.0
    assert real["confidence"]["mean"] == 4.0 and syn["confidence"]["mean"] == 5.0
    assert s["per_reader"]["1"]["real"]["accuracy"] == pytest.approx(41 / 51)
    # reader 1 misses real cases 41..50, of classes (case % 3) c, a, b, c, a, b, c, a, b, c: 17 cases per class
    by_class = s["per_reader"]["1"]["real"]["by_class"]
    assert by_class == pytest.approx({"a": 14 / 17, "b": 14 / 17, "c": 13 / 17})
    d = s["real_minus_synthetic"]
    assert d["difference"] == pytest.approx(128 / 153 - 1)
    assert d["lo95"] < d["difference"] < d["hi95"] <= 0
    assert [p["quarter"] for p in s["by_position"]] == [1, 2, 3, 4]
    assert summarize(frame, ["a", "b", "c"], n_resamples=500)["real_minus_synthetic"] == d  # seeded


def test_fleiss_kappa_and_intra_reader_agreement_by_hand():
    # 3 readers, 4 cases, 2 classes: AAA, BBB, AAB, ABB -> P-bar 2/3, P-e 1/2, kappa 1/3
    answers = {0: "AAA", 1: "BBB", 2: "AAB", 3: "ABB"}
    rows = [
        {"reader": r, "image": case, "answer": votes[r], "showing": 1}
        for case, votes in answers.items()
        for r in range(3)
    ]
    assert fleiss(pd.DataFrame(rows), ["A", "B"]) == pytest.approx(1 / 3)
    frame = _answers([51, 51])
    assert fleiss(frame, ["a", "b", "c"]) == pytest.approx(1.0)
    # a second showing of 4 images for reader 1: agrees on 3 of them
    repeats = frame[(frame["reader"] == 1) & (frame["image"] < 4)].copy()
    repeats["showing"] = 2
    repeats.loc[repeats["image"] == 0, "answer"] = "b"
    s = summarize(pd.concat([frame, repeats]), ["a", "b", "c"], n_resamples=50)
    assert s["intra_reader"]["1"]["pairs"] == 4 and s["intra_reader"]["1"]["agreement"] == 0.75
    assert "2" not in s["intra_reader"]
    assert s["per_reader"]["1"]["answered"] == 102  # repeats are not counted twice


def test_bootstrap_resamples_readers_as_well_as_cases():
    # readers that disagree widely: resampling readers must widen the interval beyond cases alone
    frame = _answers([20, 50])
    wide = bootstrap_difference(frame, 1000)
    one = bootstrap_difference(frame[frame["reader"] == 2], 1000)
    assert (wide["hi95"] - wide["lo95"]) > 2 * (one["hi95"] - one["lo95"])


def test_analyze_and_export_from_the_database(built):
    cfg, out = built
    conn = db.connect(out)
    rid, _ = db.add_reader(conn, "oct-condition", "A")
    pending, _ = db.add_reader(conn, "oct-condition", "B")
    key = {
        r["item_id"]: r["truth"]
        for r in conn.execute("SELECT t.item_id, i.truth FROM items t JOIN images i ON i.image_id = t.image_id")
    }
    order = [
        r["item_id"] for r in conn.execute("SELECT item_id FROM orders WHERE reader_id = ? ORDER BY position", (rid,))
    ]
    for pos, item in enumerate(order):
        conn.execute(
            "INSERT INTO answers(reader_id, item_id, answer, confidence, position, last_edit_at) VALUES (?,?,?,?,?,?)",
            (rid, item, key[item], 3, pos, db.now()),
        )
    conn.execute(
        "INSERT INTO answers(reader_id, item_id, answer, confidence, position, last_edit_at) VALUES (?,?,?,?,?,?)",
        (pending, order[0], "drusen", 2, 0, db.now()),
    )
    conn.execute("UPDATE readers SET submitted_at = ? WHERE reader_id = ?", (db.now(), rid))
    result = analyze(reader_dir(cfg), n_resamples=100)
    oct_ = result["oct-condition"]
    assert oct_["readers"] == 1 and oct_["pending_readers"] == 1
    assert oct_["per_reader"][str(rid)]["real"]["accuracy"] == 1.0
    assert result["cholecystectomy-phase"] == {"readers": 0, "pending_readers": 0}
    assert json.loads((out / "analysis.json").read_text())["oct-condition"]["readers"] == 1
    assert (out / "oct-condition-accuracy.png").stat().st_size > 0
    answers = pd.read_csv(out / "exports" / "answers.csv")
    assert len(answers) == len(order) + 1 and set(answers["reader"]) == {rid, pending}
    mrmc = pd.read_csv(out / "exports" / "mrmc.csv")
    assert list(mrmc.columns[:6]) == ["study", "reader", "modality", "case", "truth", "rating"]
    assert len(mrmc) == 12 and set(mrmc["modality"]) == {"real", "synthetic"} and mrmc["rating"].eq(1).all()
    assert export(out)[0] == out / "exports" / "answers.csv"
    assert np.isnan(oct_["fleiss_kappa"])  # one reader: no agreement between readers to measure


def test_pipeline_builds_the_reader_study_unless_disabled(monkeypatch):
    import medisyn.cli as cli
    from medisyn.config import load_config

    ran = []
    monkeypatch.setattr(cli, "run_stage", lambda name, cfg: ran.append(name))
    monkeypatch.setattr(cli, "check_classes_before_ingest", lambda cfg: None)  # no phantoms are written here
    cli.run_pipeline(load_config("jobs/configs/demo.yaml"))
    assert ran[-2:] == ["reader", "report"] and ran[0] == "phantoms"
    ran.clear()
    cli.run_pipeline(load_config("jobs/configs/demo-memorize.yaml"))
    assert "reader" not in ran and ran[-1] == "report"


def _answer_all(conn, reader_id: int, right: int) -> None:
    """The reader answers every item, the first ``right`` of their order correctly, and submits."""
    key = {
        r["item_id"]: (r["truth"], json.loads(r["classes"]))
        for r in conn.execute(
            "SELECT t.item_id, i.truth, s.classes FROM items t JOIN images i ON i.image_id = t.image_id "
            "JOIN studies s ON s.name = t.study"
        )
    }
    order = conn.execute("SELECT position, item_id FROM orders WHERE reader_id = ? ORDER BY position", (reader_id,))
    for pos, item in order.fetchall():
        truth, classes = key[item]
        answer = truth if pos < right else next(c for c in classes if c != truth)
        conn.execute(
            "INSERT INTO answers(reader_id, item_id, answer, confidence, position, last_edit_at) VALUES (?,?,?,?,?,?)",
            (reader_id, item, answer, 4, pos, db.now()),
        )
    conn.execute("UPDATE readers SET submitted_at = ? WHERE reader_id = ?", (db.now(), reader_id))


def test_report_shows_the_study_then_the_papers_table_once_readers_submit(built):
    from medisyn.report import run as report

    cfg, out = built
    page = report(cfg).read_text()
    assert "<h2>Reader study</h2>" in page and "No reader has submitted yet" in page
    assert "Which condition does this optical coherence tomography image show?" in page
    conn = db.connect(out)
    for name, right in (("A", 15), ("B", 15)):
        rid, _ = db.add_reader(conn, "oct-condition", name)
        _answer_all(conn, rid, right)
    page = report(cfg).read_text()
    assert "<td>oct-condition</td><td>real</td><td>2</td><td>100.00 ± 0.00</td><td>4.00 ± 0.00</td>" in page
    assert "<td>92.16 ± 3.40</td><td>4.27 ± 0.76</td>" in page  # the paper's ophthalmologists beside it
    assert "Fleiss' kappa between readers 1.00" in page and "intra-reader agreement on repeated images 100%" in page
    assert '<img src="data:image/png;base64,' in page and 'alt="reader accuracy, oct-condition"' in page
    assert 'alt="reader accuracy, cholecystectomy-phase"' not in page  # no readers there


def test_the_key_images_and_exports_are_private_to_their_owner(built):
    """#39.6: the reader folder 0700, its files 0600 (the key, real images, exports, analysis)."""
    import stat

    cfg, out = built
    conn = db.connect(out)
    rid, _ = db.add_reader(conn, "oct-condition", "A")
    _answer_all(conn, rid, 15)
    analyze(out, n_resamples=10)
    folders = [out, out / "images", out / "exports"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"study.sqlite", "study.sqlite-wal", "analysis.json", "answers.csv", "mrmc.csv"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in folders), [oct(p.stat().st_mode) for p in folders]
    loose = [(p.name, oct(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o600]
    assert not loose, loose
    (out / "images").chmod(0o755)  # a study built by an earlier version is tightened on the next build
    db.connect(out, create=True).close()
    run(cfg)
    assert stat.S_IMODE((out / "images").stat().st_mode) == 0o700


def test_analysis_json_is_strict_json_with_a_reason_beside_each_null(built):
    """#39.5: one reader (no Fleiss' kappa) who answers every repeat alike (no Cohen's kappa)."""
    cfg, out = built
    conn = db.connect(out)
    rid, _ = db.add_reader(conn, "oct-condition", "A")
    order = conn.execute("SELECT position, item_id FROM orders WHERE reader_id = ?", (rid,)).fetchall()
    for pos, item in order:
        conn.execute(
            "INSERT INTO answers(reader_id, item_id, answer, confidence, position, last_edit_at) VALUES (?,?,?,?,?,?)",
            (rid, item, "drusen", 3, pos, db.now()),
        )
    conn.execute("UPDATE readers SET submitted_at = ? WHERE reader_id = ?", (db.now(), rid))
    analyze(out, n_resamples=10)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    data = json.loads((out / "analysis.json").read_text(), parse_constant=refuse)
    s = data["oct-condition"]
    assert s["fleiss_kappa"] is None and "fewer than two" in s["fleiss_kappa_note"]
    intra = s["intra_reader"][str(rid)]
    assert intra["agreement"] == 1.0 and intra["kappa"] is None and "one answer" in intra["kappa_note"]
    assert s["across_readers"]["real"]["accuracy"]["sd"] is None  # one reader: no sd


def test_every_csv_export_neutralises_formula_cells(built):
    """#39.7: names the admin set (and any text) starting = + - @ tab CR are written as text."""
    cfg, out = built
    conn = db.connect(out)
    names = ['=HYPERLINK("http://x.example","x")', "+1+1", "-2", "@SUM(A1)", "\tx", "\rx", "Dr Plain"]
    for name in names:
        rid, _ = db.add_reader(conn, "oct-condition", name)
        _answer_all(conn, rid, 3)
    export(out)
    for name in ("answers.csv", "mrmc.csv"):
        with open(out / "exports" / name, newline="") as f:
            rows = list(csv.reader(f))
        assert len(rows) > 1 and not [c for r in rows for c in r if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    with open(out / "exports" / "answers.csv", newline="") as f:
        written = {r["reader_name"] for r in csv.DictReader(f)}
    assert written == {"'" + n for n in names[:-1]} | {"Dr Plain"}
    kept = csv_safe(pd.DataFrame({"item": ["-dG6y_5q_QAq0fqXshOXwA"], "answer": ["-x"]}))  # an id as stored
    assert kept.to_dict("records") == [{"item": "-dG6y_5q_QAq0fqXshOXwA", "answer": "'-x"}]
    assert all(db.new_id()[0].isalnum() for _ in range(300))


def test_revoke_and_reissue_from_the_command_line(built, capsys):
    """#39.1: `medisyn reader revoke|reissue --reader NAME`, and the expiry setting."""
    from medisyn.cli import main

    cfg, out = built
    base = ["--config", "jobs/configs/demo.yaml", f"run_dir={cfg.run_dir}", "reader.link_expiry_hours=2"]
    assert main(["reader", "add-reader", "--study", "oct-condition", "--name", "Dr A", *base]) == 0
    assert "/#t=" in capsys.readouterr().out
    conn = db.connect(out)
    row = db.find_reader(conn, "Dr A")
    left = (pd.Timestamp(row["link_expires_at"]) - pd.Timestamp.now(tz="UTC")).total_seconds() / 3600
    assert 1.9 < left <= 2
    session = db.exchange(conn, "nope") or "none"
    assert db.session_reader(conn, session) is None
    assert main(["reader", "revoke", *base]) == 2 and "--reader NAME" in capsys.readouterr().err
    assert main(["reader", "revoke", "--reader", "Dr B", *base]) == 2
    assert "no reader named 'Dr B'" in capsys.readouterr().err
    assert main(["reader", "revoke", "--reader", "Dr A", *base]) == 0
    assert "reader 1: revoked" in capsys.readouterr().out
    assert db.find_reader(conn, "1")["revoked_at"] is not None
    assert main(["reader", "reissue", "--reader", "Dr A", "--base-url", "https://r.lab.org", *base]) == 0
    link = capsys.readouterr().out
    assert "reader 1 (oct-condition): https://r.lab.org/#t=" in link and "expires in 2 h" in link
    token = link.split("#t=")[1].split()[0]
    assert db.session_reader(conn, db.exchange(conn, token)) is not None
    assert db.exchange(conn, token) is None  # once
    db.add_reader(conn, "oct-condition", "Dr A")
    assert main(["reader", "revoke", "--reader", "Dr A", *base]) == 2
    assert "2 readers are named 'Dr A'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="link_expiry_hours"):
        load_config(None, ["reader.link_expiry_hours=0"])

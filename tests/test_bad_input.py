"""Bad input as a careless or hostile user gives it: one-line errors naming the file or field,
rejects with their reason, nothing read from outside a repository, no identifier echoed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import flat
from PIL import Image

from medisyn.config import load_config
from medisyn.configtools import ConfigError, build
from medisyn.ingest.config import IngestConfig, RepositoryConfig
from medisyn.ingest.listing import list_repository, load_repositories

ROOT = Path(__file__).resolve().parents[1]
CANARY = "LEAKCANARY^Jane"


def _repo(**changes) -> RepositoryConfig:
    entry = {
        "name": "photos",
        "kind": "image",
        "path": "photos",
        "glob": "*.png",
        "labels_csv": "labels.csv",
        "path_column": "file",
        "label_columns": ["dx"],
        "patient_column": "patient",
        "template": "Clinical image showing {label}.",
        "specialty": "dermatology",
        "image_type": "clinical images",
        "classes": {"ps": "psoriasis", "ec": "eczema"},
    }
    return build(RepositoryConfig, entry | changes, "test")


def _tree(root: Path, csv: bytes, files=("a.png", "b.png")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / name)
    (root / "labels.csv").write_bytes(csv)
    return root


def _reasons(repo: RepositoryConfig, root: Path) -> dict[str, str]:
    items, rejects, source_map = list_repository(repo, root, IngestConfig())
    return {source_map[r["source_ref"]]: r["reason"] for r in rejects} | {source_map[i.ref]: "ok" for i in items}


def test_label_csv_problems_are_one_line_errors_that_echo_no_cell(tmp_path):
    headerless = f"a.png,{CANARY},ps\nb.png,{CANARY},ec\n".encode()
    with pytest.raises(ConfigError) as err:
        list_repository(_repo(), _tree(tmp_path / "h", headerless), IngestConfig())
    assert "has no column(s) 'file', 'patient', 'dx' among its 3 columns" in str(err.value)
    assert CANARY not in str(err.value) and "\n" not in str(err.value)
    for body, message in (
        (b"", "is empty"),
        (
            b"file,patient,dx\na.png,p1,ps\nb.png,p2,ec,extra,more\n",
            r"well-formed CSV \(.*Expected 3 fields in line 3, saw 5\)",
        ),
        ("file,patient,dx\na.png,Jos\xe9,ps\n".encode("latin-1"), "is not utf-8 text; set the repository's encoding"),
    ):
        with pytest.raises(ConfigError, match=message):
            list_repository(_repo(), _tree(tmp_path / str(len(body)), body), IngestConfig())
    latin = _tree(tmp_path / "latin", "file,patient,dx\na.png,Jos\xe9,ps\nb.png,Ren\xe9e,ec\n".encode("latin-1"))
    assert _reasons(_repo(encoding="latin-1"), latin) == {"a.png": "ok", "b.png": "ok"}
    with pytest.raises(ConfigError, match="unknown encoding 'klingon'"):
        _repo(encoding="klingon")


def test_templates_and_globs_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \{patient\}; only \{label\} is filled in"):
        _repo(template="Image of {patient} showing {label}.")
    for key, value in (("glob", "../other/*.png"), ("glob", "/etc/*"), ("labels_csv", "../labels.csv")):
        with pytest.raises(ConfigError, match=f"{key} .* must stay inside the repository"):
            _repo(**{key: value})


def test_links_out_of_the_root_bad_names_and_conflicting_rows_become_rejects(tmp_path):
    csv = b"file,patient,dx\na.png,p1,ps\nb.png,p2,ec\nb.png,p2,ps\nc.png,p3,ps\nd.png,p4,ec\nd.png,p4,ec\n"
    root = _tree(tmp_path / "photos", csv, files=("a.png", "b.png", "d.png"))
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(secret)
    (root / "c.png").symlink_to(secret)  # listed, but the bytes live outside the repository
    (root / os.fsdecode(b"bad\xff.png")).write_bytes((root / "a.png").read_bytes())
    reasons = _reasons(_repo(), root)
    assert reasons["a.png"] == "ok" and reasons["d.png"] == "ok"  # a repeated identical row is no conflict
    assert reasons["b.png"] == "conflicting labels: rows of labels.csv for this file disagree"
    assert reasons["c.png"] == "outside the repository root (a symbolic link that leaves it)"
    assert reasons["bad\ufffd.png"] == "file name is not valid UTF-8"


def test_config_and_repositories_files_that_are_not_yaml(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 12\)"):
        load_config(latin)
    binary = tmp_path / "repos.yaml"
    binary.write_bytes(b"\x00\x01\x02 repositories")
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [*flat(binary)])
    with pytest.raises(ConfigError, match="is a binary file, not YAML"):
        load_repositories(cfg.ingest)
    binary.write_text(f"repositories:\n  - name: [{CANARY}\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML \(line \d+, column \d+: ") as err:
        load_repositories(cfg.ingest)
    assert CANARY not in str(err.value)
    binary.write_text(yaml.safe_dump({"repositories": "photos"}))
    with pytest.raises(ConfigError, match="expected a mapping with a 'repositories' list"):
        load_repositories(cfg.ingest)


def test_a_busy_stage_stops_a_second_run_and_a_finished_stage_sweeps_old_partial_writes(tmp_path, capsys):
    import time

    from medisyn.cli import main
    from medisyn.records import StageBusy, stage_lock, sweep_partial_writes

    run_dir = tmp_path / "run"
    with stage_lock(run_dir, "report"):
        with pytest.raises(StageBusy, match=r"stage 'report' is already running on .* \(pid \d+ on "):
            with stage_lock(run_dir, "report"):
                pass
        with stage_lock(run_dir, "ingest"):  # other stages are free
            pass
        code = main(["report", "--config", str(ROOT / "jobs/configs/demo.yaml"), f"run_dir={run_dir}"])
        assert code == 2 and "is already running" in capsys.readouterr().err
    old, new = run_dir / "a" / ".x.png.1.tmp", run_dir / "b" / ".y.png.2.tmp"
    for f in (old, new):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")
    os.utime(old, (time.time() - 60, time.time() - 60))
    assert sweep_partial_writes(run_dir, before=time.time() - 30) == 1 and not old.exists() and new.exists()
    assert main(["report", "--config", str(ROOT / "jobs/configs/demo.yaml"), f"run_dir={run_dir}"]) == 0  # free again


# --- properties: any input loads or fails in one line naming the file or field, echoing no identifier ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SCALARS = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=12) | st.just(CANARY)
VALUES = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8
)
SECTIONS = ["run_dir", "seed", "model", "train", "ingest", "generate", "select", "audit_utility", "reader", CANARY]
FIELDS = ["epochs", "size", "steps", "learning_rate", "tasks", "repositories_file", "preset", "port", CANARY]


def _one_line(exc: Exception) -> None:
    assert "\n" not in str(exc) and "Traceback" not in str(exc), str(exc)


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(SECTIONS), VALUES | st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=3), max_size=4
    )
    | st.binary(max_size=200)
)
def test_any_config_file_loads_or_fails_in_one_line(tmp_path, doc):
    path = tmp_path / "config.yaml"
    path.write_bytes(doc if isinstance(doc, bytes) else yaml.safe_dump(doc).encode())
    try:
        load_config(path)
    except ConfigError as exc:
        _one_line(exc)


ENTRY_KEYS = ["name", "kind", "path", "glob", "labels_csv", "path_column", "label_columns", "patient_column",
              "template", "specialty", "image_type", "classes", "encoding", CANARY]  # fmt: skip


@PROPERTY
@given(st.lists(st.dictionaries(st.sampled_from(ENTRY_KEYS), VALUES, max_size=8) | VALUES, max_size=3) | VALUES)
def test_any_repositories_file_loads_or_fails_in_one_line(tmp_path, repositories):
    path = tmp_path / "repositories.yaml"
    path.write_text(yaml.safe_dump({"repositories": repositories}))
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [*flat(path)])
    try:
        load_repositories(cfg.ingest)
    except ConfigError as exc:
        _one_line(exc)


CELLS = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=8) | st.just(CANARY) | st.just("a.png")


@PROPERTY
@given(st.lists(st.lists(CELLS, max_size=4), max_size=6), st.booleans())
def test_any_label_table_lists_or_fails_without_echoing_a_cell(tmp_path, rows, header):
    import csv
    import io
    import uuid

    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(["file", "patient", "dx"])
    writer.writerows(rows)
    root = _tree(tmp_path / uuid.uuid4().hex, buf.getvalue().encode())
    try:
        items, rejects, _ = list_repository(_repo(), root, IngestConfig())
    except ConfigError as exc:
        _one_line(exc)
        assert CANARY not in str(exc)
        return
    assert not any(CANARY in r["reason"] for r in rejects)
    assert not any(CANARY in (i.caption + i.ref + i.patient) for i in items)

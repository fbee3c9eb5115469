"""Class phrases: every prompt label, utility-task class and reader-study class must be a phrase the
data has, of its own specialty and image type, checked before any work (medisyn/phrases.py). No Ray:
corpora here are a metadata shard or an index, repositories the phantom catalog's description."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from medisyn.config import ConfigError, load_config
from medisyn.phrases import ClassNeed, check_classes, corpus_phrases
from medisyn.records import INDEX_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs/configs/demo.yaml"
ROWS = [  # (specialty, image_type, source, labels)
    ("dermatology", "dermoscopy", "isic", ["melanocytic nevi"]),
    ("dermatology", "dermoscopy", "isic", ["melanoma"]),
    ("radiology", "X-ray", "chest-xray", ["edema", "lung opacity"]),
    ("radiology", "X-ray", "mammography", ["a benign mass"]),
    ("ophthalmology", "optical coherence tomography", "oct", ["drusen"]),
    ("ophthalmology", "optical coherence tomography", "oct", ["normal findings"]),
]


def _table(rows) -> dict:
    return {
        "specialty": [r[0] for r in rows],
        "image_type": [r[1] for r in rows],
        "source": [r[2] for r in rows],
        "labels": [r[3] for r in rows],
    }


def write_corpus(corpus: Path, rows=ROWS, indexed: bool = True) -> Path:
    """A corpus folder the readers accept. Indexed: ``_shards.json`` names an index and a shard that
    does not exist, so a read that opened a shard (an image) would fail."""
    corpus.mkdir(parents=True)
    cols = _table(rows)
    if not indexed:
        pq.write_table(pa.table(cols), corpus / "part-00000.parquet")
        return corpus
    n = len(rows)
    full = {f.name: cols.get(f.name, [None] * n) for f in INDEX_SCHEMA}
    full |= {"id": [f"id{i}" for i in range(n)], "shard": ["part-missing.parquet"] * n, "row": list(range(n))}
    full |= {"row_group": [0] * n, "split": ["train"] * n}
    (corpus / "_index").mkdir()
    pq.write_table(pa.table(full, schema=INDEX_SCHEMA), corpus / "_index" / "abc.parquet")
    (corpus / "_shards.json").write_text(
        json.dumps({"shards": ["part-missing.parquet"], "index": "_index/abc.parquet"})
    )
    return corpus


def demo_config(tmp_path: Path, *overrides: str):
    """The demo's config reading its catalog entries from folders that exist (empty: no pixel drawn), so
    every entry's phrases are the configured sources'."""
    root = tmp_path / "sources"
    for name in load_config(DEMO).ingest.source_entries:
        (root / name).mkdir(parents=True, exist_ok=True)
    return load_config(DEMO, [f"run_dir={tmp_path / 'run'}", f"ingest.sources_root={root}", *overrides])


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the shared check ---


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "shards"])
def test_corpus_phrases_come_from_metadata_only(tmp_path, indexed):
    corpus = write_corpus(tmp_path / "corpus", indexed=indexed)
    got = corpus_phrases(corpus)
    assert got == {(sp, it, src, p) for sp, it, src, labels in ROWS for p in labels}  # a multi-finding row: each
    assert ("radiology", "X-ray", "chest-xray", "lung opacity") in got


def test_a_typo_names_the_class_where_it_comes_from_and_the_near_miss(tmp_path):
    phrases = corpus_phrases(write_corpus(tmp_path / "corpus"))
    need = ClassNeed("melanocytic nevus", "utility task 'dermoscopy'", "dermatology", "dermoscopy", ("isic",))
    with pytest.raises(ConfigError) as err:
        check_classes([ClassNeed("melanoma", "x", "dermatology", "dermoscopy"), need], phrases, "the corpus's labels")
    msg = str(err.value)
    assert msg.startswith("utility task 'dermoscopy': class 'melanocytic nevus' matches no phrase of the corpus's")
    assert "did you mean 'melanocytic nevi'?" in msg


def test_a_phrase_of_another_specialty_or_source_does_not_pass(tmp_path):
    phrases = corpus_phrases(write_corpus(tmp_path / "corpus"))
    derm = ClassNeed("edema", "prompt set 'mine' prompts[0]", "dermatology", "dermoscopy")
    with pytest.raises(ConfigError, match=r"'edema' is a phrase of radiology X-ray \(chest-xray\) only"):
        check_classes([derm], phrases, "the corpus's labels")
    check_classes([ClassNeed("edema", "p", "radiology", "X-ray")], phrases, "c")  # its own type: passes
    wrong_source = ClassNeed("a benign mass", "utility task 'chest'", "radiology", "X-ray", ("chest-xray",))
    with pytest.raises(ConfigError, match="utility task 'chest': class 'a benign mass'.*from chest-xray"):
        check_classes([wrong_source], phrases, "c")
    none = ClassNeed("glioma", "reader study 'mri'", "radiology", "magnetic resonance imaging")
    with pytest.raises(ConfigError, match="image at all; source 'brats' has it but is skipped: absent"):
        check_classes([none], phrases, "c", {"glioma": "source 'brats' has it but is skipped: absent"})


# --- the call sites ---


def test_generate_refuses_a_label_the_corpus_lacks_before_any_image(tmp_path):
    from medisyn.infer.generate import run

    write_corpus(tmp_path / "run" / "corpus")
    entry = {"prompt": "Dermoscopy image showing nevus.", "count": 2, "specialty": "dermatology"}
    bad = write_yaml(tmp_path / "mine.yaml", {"name": "mine", "prompts": [entry | {"labels": ["melanocytic nevus"]}]})
    cfg = demo_config(tmp_path, f"generate.sets=[{bad}]")
    with pytest.raises(
        ConfigError, match=r"prompt set 'mine' prompts\[0\]: class 'melanocytic nevus'.*'melanocytic nevi'"
    ):
        run(cfg)
    good = write_yaml(tmp_path / "ok.yaml", {"name": "ok", "prompts": [entry | {"labels": ["melanocytic nevi"]}]})
    with pytest.raises(FileNotFoundError, match="no exported pipeline"):  # past the check, at the model
        run(demo_config(tmp_path, f"generate.sets=[{good}, fid]", "select.num_images=2"))


def test_audit_utility_refuses_a_task_class_the_corpus_lacks(tmp_path):
    from medisyn.audit.utility import run

    write_corpus(tmp_path / "run" / "corpus")
    task = {"name": "derm", "specialty": "dermatology", "image_type": "dermoscopy", "kind": "multiclass"}
    tasks = write_yaml(
        tmp_path / "tasks.yaml",
        {"tasks": [task | {"classes": ["melanoma", "melanocytic nevus"], "synthetic_set": "u"}]},
    )
    with pytest.raises(ConfigError, match="utility task 'derm': class 'melanocytic nevus'.*'melanocytic nevi'"):
        run(demo_config(tmp_path, f"audit_utility.tasks_file={tasks}"))


def test_reader_refuses_a_study_class_the_corpus_lacks(tmp_path):
    from medisyn.reader.study import run

    write_corpus(tmp_path / "run" / "corpus")
    study = {"name": "oct", "specialty": "ophthalmology", "image_type": "optical coherence tomography"}
    studies = write_yaml(
        tmp_path / "studies.yaml",
        {"studies": [study | {"classes": ["drusen", "normal finding"], "synthetic_set": "r"}]},
    )
    with pytest.raises(ConfigError, match="reader study 'oct': class 'normal finding'.*did you mean 'normal findings'"):
        run(demo_config(tmp_path, f"reader.studies_file={studies}", f"reader.dir={tmp_path / 'reader'}"))
    assert not (tmp_path / "reader").exists()  # refused before the study database is made


def test_the_demo_and_paper_sets_pass_against_the_phantom_phrases(tmp_path):
    from medisyn.cli import check_classes_before_ingest

    check_classes_before_ingest(demo_config(tmp_path))  # memorization, utility, reader; demo tasks and studies
    check_classes_before_ingest(demo_config(tmp_path, "audit_utility.tasks_file=paper", "reader.studies_file=paper"))


def test_the_pipeline_stops_on_a_typo_after_the_phantoms_before_ingest(tmp_path, monkeypatch):
    from medisyn import cli

    study = {"name": "s", "specialty": "surgery", "image_type": "endoscopy", "synthetic_set": "reader"}
    studies = write_yaml(
        tmp_path / "s.yaml", {"studies": [study | {"classes": ["clipping and cutting", "preparaton"]}]}
    )
    ran = []
    monkeypatch.setattr(cli, "run_stage", lambda name, cfg: ran.append(name))
    with pytest.raises(ConfigError, match="reader study 's': class 'preparaton'.*did you mean 'preparation'"):
        cli.run_pipeline(demo_config(tmp_path, f"reader.studies_file={studies}"))
    assert ran == ["phantoms"]
    # the same classes in gastroenterology endoscopy: surgery's phases are not theirs
    study |= {"specialty": "gastroenterology", "classes": ["polyps", "preparation"]}
    write_yaml(tmp_path / "s.yaml", {"studies": [study]})
    with pytest.raises(ConfigError, match=r"'preparation' is a phrase of surgery endoscopy \(cholec80\) only"):
        cli.check_classes_before_ingest(demo_config(tmp_path, f"reader.studies_file={studies}"))


def test_the_paper_catalog_gives_every_paper_class():
    """The shipped catalog's phrases (every entry's, read or not) cover the paper's prompt sets, tasks
    and studies: one source of truth for what a caption can say."""
    catalog = ROOT / "jobs/configs/sources/paper.yaml"
    if not catalog.is_file():
        pytest.skip("jobs/configs/sources/paper.yaml is not written yet")
    from medisyn.audit.arms import load_tasks, task_needs
    from medisyn.infer.prompts import class_needs, load_prompt_set
    from medisyn.ingest.describe import load_catalog
    from medisyn.reader.config import load_studies, study_needs

    phrases = {(e.specialty, e.image_type, e.name, p) for e in load_catalog("paper") for p in e.phrases()}
    needs = [n for s in ("memorization", "utility", "reader") for n in class_needs(load_prompt_set(s))]
    needs += task_needs(load_tasks("paper")) + study_needs(load_studies("paper"))
    check_classes(needs, phrases, "catalog 'paper'")


def test_before_ingest_a_class_only_an_absent_catalog_entry_has_is_named_with_the_entry(tmp_path):
    """A catalog entry whose folder is absent adds nothing to the corpus: its phrases do not count."""
    from medisyn.cli import check_classes_before_ingest

    cfg = load_config(
        DEMO,
        [f"run_dir={tmp_path}", "ingest.repositories_file=", "ingest.sources=paper", f"ingest.sources_root={tmp_path}"],
    )
    with pytest.raises(ConfigError, match=r"prompts\[0\]: class 'no presence of pulmonary embolism'.*'rspect'.*absent"):
        check_classes_before_ingest(cfg)

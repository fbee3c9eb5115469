"""Generation: prompt sets checked up front; counts, manifest and metadata; resume equals an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from medisyn.config import load_config
from medisyn.configtools import ConfigError
from medisyn.infer.prompts import image_identity, load_prompt_set, match_to_corpus

ROOT = Path(__file__).resolve().parents[1]


def _write_set(path: Path, prompts: list[dict], name: str = "tiny-set") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "prompts": prompts}))
    return path


def test_paper_sets_load():
    mem, util = load_prompt_set("memorization"), load_prompt_set("utility")
    assert mem.total == 20 * 500 and len({e.specialty for e in mem.entries}) == 6
    by_task = {}
    for e in util.entries:
        by_task[e.task] = by_task.get(e.task, 0) + e.count
    assert by_task == {"chest-xray": 1000, "dermoscopy": 1000, "prostatectomy": 1000}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"prompt": "x", "count": 2, "colour": "red"}, "prompts[0]: unknown key 'colour'"),
        ({"prompt": "  ", "count": 2}, "prompts[0]: empty prompt"),
        ({"prompt": "CT image.", "count": 0}, "prompts[0] ('CT image.'): count must be a positive integer, got 0"),
        ({"prompt": "CT image.", "count": "5"}, "count must be a positive integer, got '5'"),
        (
            {"prompt": "CT image.", "count": 1, "specialty": "cardiology"},
            "unknown specialty 'cardiology'; expected one of radiology",
        ),
        ({"prompt": "CT image.", "count": 1, "image_type": "PET"}, "unknown image_type 'PET'"),
    ],
)
def test_malformed_sets_name_the_entry(tmp_path, entry, message):
    with pytest.raises(ConfigError) as err:
        load_prompt_set(str(_write_set(tmp_path / "bad.yaml", [entry])))
    assert message in str(err.value)


def test_csv_sets_and_their_errors(tmp_path):
    good = tmp_path / "mine.csv"
    good.write_text("prompt,count,specialty,labels\nDermoscopy image showing melanoma.,3,dermatology,melanoma\n")
    s = load_prompt_set(str(good))
    assert s.name == "mine" and s.entries[0].count == 3 and s.entries[0].labels == ("melanoma",)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,count\nA prompt.,many\n")
    with pytest.raises(ConfigError, match=r"bad.csv row 2 \('A prompt.'\): count 'many' is not an integer"):
        load_prompt_set(str(bad))
    with pytest.raises(ConfigError, match="known: memorization, reader, utility, fid"):
        load_prompt_set("nonexistent")


def test_ids_and_seeds_are_pure_functions():
    assert image_identity("s", "p", 3) == image_identity("s", "p", 3)
    assert len({image_identity("s", "p", i) for i in range(100)}) == 100
    assert image_identity("s", "p", 0) != image_identity("t", "p", 0)


def test_match_to_corpus_keeps_task_totals():
    s = load_prompt_set("utility")
    caps = ["Dermoscopy image showing melanoma."] * 3 + ["Dermoscopy image showing melanocytic nevi."]
    m = match_to_corpus(s, caps)
    derm = {e.prompt: e.count for e in m.entries if e.task == "dermoscopy"}
    assert derm == {"Dermoscopy image showing melanoma.": 750, "Dermoscopy image showing melanocytic nevi.": 250}
    assert sum(e.count for e in m.entries if e.task == "chest-xray") == 1000  # no match: unchanged


def test_match_to_corpus_reproduces_the_corpus_multi_finding_share():
    """A chest X-ray corpus where ~30% of images show several findings: the utility prompts carry
    those captions (the paper's "… showing {diseases}") in the same share, with their labels."""
    from medisyn.ingest.listing import join_phrases

    s = load_prompt_set("utility")
    findings = ["lung opacity", "pleural effusion", "cardiomegaly", "edema"]
    rng = np.random.default_rng(0)
    caps = []
    for _ in range(2000):
        k = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        chosen = [findings[i] for i in sorted(rng.choice(4, k, replace=False))]
        caps.append(f"Frontal (AP) chest X-ray image showing {join_phrases(chosen)}.")
    caps += ["Frontal (AP) chest X-ray image showing atelectasis and pneumonia."] * 50  # none of the task's classes
    caps += ["Dermoscopy image showing melanoma."] * 10
    corpus_multi = np.mean([" and " in c for c in caps[:2000]])
    m = match_to_corpus(s, caps)
    cxr = [e for e in m.entries if e.task == "chest-xray"]
    assert sum(e.count for e in cxr) == 1000  # the task keeps its total
    multi = sum(e.count for e in cxr if len(e.labels) > 1) / 1000
    assert 0.27 < corpus_multi < 0.33 and abs(multi - corpus_multi) < 0.01
    by_prompt = {e.prompt: e for e in cxr}
    both = by_prompt["Frontal (AP) chest X-ray image showing lung opacity, pleural effusion and edema."]
    assert both.labels == ("lung opacity", "pleural effusion", "edema") and both.image_type == "X-ray"
    assert not any("atelectasis" in e.prompt for e in cxr)
    derm = {e.prompt: e.count for e in m.entries if e.task == "dermoscopy"}
    assert derm == {"Dermoscopy image showing melanoma.": 1000}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from medisyn.models import build_pipeline, save_pipeline

    return save_pipeline(build_pipeline("tiny"), tmp_path_factory.mktemp("model") / "tiny")


def _cfg(run_dir: Path, model: Path, set_file: Path):
    return load_config(
        ROOT / "jobs/configs/demo.yaml",
        [
            f"run_dir={run_dir}",
            f"generate.checkpoint={model}",
            f"generate.sets=[{set_file}]",
            "generate.steps=3",
            "generate.guidance_scale=7.0",
            "generate.resolution=64",
            "generate.batch_size=4",
            "generate.max_actors=1",
            "generate.max_per_prompt=0",
        ],
    )


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png")) if f.name != "contact_sheet.png"}


@pytest.mark.ray
def test_generate_counts_manifest_metadata_and_resume(ray_cluster, tiny_model, tmp_path):
    from medisyn.infer.generate import run

    set_file = _write_set(
        tmp_path / "tiny-set.yaml",
        [
            {
                "prompt": "Dermoscopy image showing melanoma.",
                "count": 5,
                "specialty": "dermatology",
                "image_type": "dermoscopy",
                "labels": ["melanoma"],
            },
            {"prompt": "Optical coherence tomography image showing drusen.", "count": 3, "specialty": "ophthalmology"},
        ],
    )
    (result,) = run(_cfg(tmp_path / "a", tiny_model, set_file))
    out = tmp_path / "a/synthetic/tiny-set"
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    assert result["images"] == 8 and len(manifest) == 8 and manifest["id"].is_unique
    assert manifest.groupby("prompt").size().to_dict() == {
        "Dermoscopy image showing melanoma.": 5,
        "Optical coherence tomography image showing drusen.": 3,
    }
    row = manifest.iloc[0]
    assert (row.steps, row.guidance_scale, row.scheduler, row.checkpoint) == (3, 7.0, "euler", "tiny")
    assert list(row.original_size) == [64, 64]  # a pipeline that records no sizes: the output size
    assert (row["id"], row.seed) == image_identity("tiny-set", row.prompt, row["index"])
    png = Image.open(out / row.file)
    assert png.size == (64, 64) and png.text == {"prompt": row.prompt, "seed": str(row.seed), "checkpoint": "tiny"}
    assert set(png.info) - {"prompt", "seed", "checkpoint"} <= {"dpi"}
    assert (out / "contact_sheet.png").exists()
    uninterrupted = _pixels(out)
    assert len(uninterrupted) == 8

    # an interrupted run: some images made, one write cut short, no manifest yet
    b = tmp_path / "b/synthetic/tiny-set"
    b.mkdir(parents=True)
    for name in list(uninterrupted)[:3]:
        (b / name).write_bytes((out / name).read_bytes())
    (b / f".{list(uninterrupted)[3]}.0123.tmp").write_bytes(b"half a png")
    (again,) = run(_cfg(tmp_path / "b", tiny_model, set_file))
    assert again["made"] == 5 and again["images"] == 8
    resumed = _pixels(b)
    assert set(resumed) == set(uninterrupted) and not list(b.glob(".*.tmp"))
    # the guidance gap is a pure function of an image's seed and settings: the resumed set records the same
    # gaps, the three images whose files were there (no record) by their first steps alone
    gaps = dict(zip(manifest["file"], manifest["guidance_gap"], strict=True))
    assert all(np.isfinite(g) and g > 0 for g in gaps.values())
    regap = pq.read_table(b / "manifest.parquet").to_pandas().set_index("file")["guidance_gap"].to_dict()
    assert regap == pytest.approx(gaps, rel=1e-4)
    for name, px in uninterrupted.items():
        assert np.abs(px.astype(int) - resumed[name].astype(int)).max() <= 1, name
    finished = {p.name: p.stat().st_mtime_ns for p in b.iterdir() if p.is_file()}
    (third,) = run(_cfg(tmp_path / "b", tiny_model, set_file))  # nothing left to do: nothing is written
    assert third["made"] == 0 and len(pq.read_table(b / "manifest.parquet")) == 8
    assert {p.name: p.stat().st_mtime_ns for p in b.iterdir() if p.is_file()} == finished

    # a finished set whose file was truncated afterwards (its size no longer matches the record),
    # and one whose bytes were damaged without a record: both are made again, nothing else
    recorded = pq.read_table(b / "manifest.parquet").to_pandas().set_index("file")
    cut, broken = sorted(uninterrupted)[:2]
    data = (b / cut).read_bytes()
    (b / cut).write_bytes(data[: len(data) // 2])
    assert recorded.loc[cut, "bytes"] == len(data) and recorded.loc[cut, "sha256"] == hashlib.sha256(data).hexdigest()
    (fourth,) = run(_cfg(tmp_path / "b", tiny_model, set_file))
    assert fourth["made"] == 1 and np.abs(_pixels(b)[cut].astype(int) - resumed[cut].astype(int)).max() <= 1
    (b / "manifest.parquet").unlink()  # no record left: what is there must decode
    (b / broken).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    (fifth,) = run(_cfg(tmp_path / "b", tiny_model, set_file))
    assert fifth["made"] == 1 and np.abs(_pixels(b)[broken].astype(int) - resumed[broken].astype(int)).max() <= 1
    assert not (b / ".written").exists()  # the write log is folded into the manifest


def test_generate_validates_every_set_before_any_image(tmp_path, tiny_model):
    from medisyn.infer.generate import run

    good = _write_set(tmp_path / "good.yaml", [{"prompt": "CT image.", "count": 1}], name="good")
    bad = _write_set(tmp_path / "bad.yaml", [{"prompt": "CT image.", "count": -1}], name="bad")
    cfg = load_config(
        ROOT / "jobs/configs/demo.yaml",
        [f"run_dir={tmp_path / 'run'}", f"generate.checkpoint={tiny_model}", f"generate.sets=[{good}, {bad}]"],
    )
    with pytest.raises(ConfigError, match="count must be a positive integer, got -1"):
        run(cfg)
    assert not (tmp_path / "run/synthetic").exists()


@pytest.mark.parametrize("name", ["../../escaped_set", "/tmp/abs", "a/b", ".hidden", "x" * 65])
def test_set_names_are_folder_names_not_paths(tmp_path, name):
    bad = _write_set(tmp_path / "bad.yaml", [{"prompt": "CT image.", "count": 1}], name=name)
    with pytest.raises(ConfigError, match="must be 1-64 letters, digits"):
        load_prompt_set(str(bad))


def test_two_sets_of_one_name_and_a_set_made_by_other_settings_are_refused(tmp_path, tiny_model):
    from medisyn.infer.generate import producer, resolve_set, run

    one = _write_set(tmp_path / "one.yaml", [{"prompt": "CT image.", "count": 1}], name="memorization")
    base = [f"run_dir={tmp_path / 'run'}", f"generate.checkpoint={tiny_model}"]
    with pytest.raises(ConfigError, match="more than one set is named 'memorization'"):
        run(load_config(ROOT / "jobs/configs/demo.yaml", [*base, f"generate.sets=[memorization, {one}]"]))
    # the built-in set made this folder: a user set of the same name, or other settings, must not reuse it
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [*base, "generate.sets=[memorization]"])
    folder = tmp_path / "run/synthetic/memorization"
    folder.mkdir(parents=True)
    made = producer(cfg, resolve_set(cfg, "memorization"), tiny_model)
    (folder / "set.json").write_text(__import__("json").dumps(made))
    other_model = tmp_path / "other-model"
    __import__("shutil").copytree(tiny_model, other_model)  # the same weights elsewhere: another checkpoint
    for override, differs in (
        (f"generate.sets=[{one}]", "prompt_set"),
        (f"generate.checkpoint={other_model}", "model"),
        ("generate.steps=3", "steps: 20 then, 3 now"),
        ("generate.guidance_scale=1.5", "guidance_scale: 3.0 then, 1.5 now"),
        ("generate.resolution=64", "resolution: 128 then, 64 now"),
    ):
        other = load_config(ROOT / "jobs/configs/demo.yaml", [*base, "generate.sets=[memorization]", override])
        with pytest.raises(ConfigError, match=f"synthetic/memorization was made by other settings.*{differs}"):
            run(other)
    # a set begun before sampling conditioned on the training crop (its set.json has no such entry)
    before_fix = {k: v for k, v in made.items() if k != "crop_conditioning"}
    (folder / "set.json").write_text(json.dumps(before_fix))
    with pytest.raises(ConfigError, match="made by other settings.*crop_conditioning: None then, 'centre crop"):
        run(cfg)
    assert list(folder.iterdir()) == [folder / "set.json"]  # nothing was made or deleted


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, proc, seconds: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail, with the run's log, if the run ends or the deadline passes."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"generation ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {seconds:.0f} s:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.5)


def _node_pids(temp: Path) -> set[int]:
    """One Ray node's processes: those whose command line names its ``temp`` dir (raylet, agents, log
    monitor) and their children (the workers, whose command lines Ray rewrites to ``ray::…``)."""
    import subprocess

    def pgrep(*args: str) -> set[int]:
        return {int(p) for p in subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()}

    named = pgrep("-f", str(temp))
    return named | {c for p in named for c in pgrep("-P", str(p))}


def _kill_node(temp: Path) -> None:
    """SIGKILL to one node's processes, as if its machine were gone (never `ray stop`, which stops every
    Ray cluster on the machine, the test session's and other people's too)."""
    import os
    import signal

    for pid in _node_pids(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.ray
@pytest.mark.slow
def test_actor_pool_grows_when_a_node_joins_and_survives_its_loss(tiny_model, tmp_path):
    """Head node with 1 CPU; generation starts on it; a second node joins with `ray start --address`
    and the pool grows onto it; that node is then killed mid-run (its raylet and workers, SIGKILL);
    the run still finishes, with every requested image exactly once."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from medisyn.infer.prompts import expand

    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a private test cluster
    env.pop("RAY_ADDRESS", None)
    # one temp dir per node (short: Ray's socket paths must fit 107 bytes), so that the second
    # node's processes, and only they, can be found and killed by it
    head_temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    node_temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    proc = None
    try:
        subprocess.run(
            [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={head_temp}"]
            + common,
            check=True,
            env=env,
            capture_output=True,
        )
        set_file = _write_set(
            tmp_path / "elastic.yaml",
            [{"prompt": f"Dermoscopy image showing melanoma. {i}", "count": 16} for i in range(6)],
            name="elastic",
        )
        requested = sorted(f"{j.id}.png" for j in expand(load_prompt_set(str(set_file))))
        run_dir = tmp_path / "run"
        out = run_dir / "synthetic/elastic"
        proc = subprocess.Popen(  # the driver, as a user runs it
            [
                sys.executable,
                "-m",
                "medisyn.cli",
                "generate",
                "--config",
                str(ROOT / "jobs/configs/demo.yaml"),
                f"run_dir={run_dir}",
                f"generate.checkpoint={tiny_model}",
                f"generate.sets=[{set_file}]",
                # enough work left when the second node has started, and when it is gone (25 steps were
                # enough for the 3.1 M U-Net; the 1.7 M one draws an image in about half the time)
                "generate.steps=45",
                "generate.resolution=128",
                "generate.batch_size=4",
                "generate.min_actors=1",
                "generate.max_actors=2",
                "generate.max_per_prompt=0",
            ],
            env={**env, "RAY_ADDRESS": address},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )

        def images() -> int:
            return len([p for p in out.glob("*.png") if p.name != "contact_sheet.png"])

        def markers() -> set[int]:  # pids of the actors that started (`<node>-<pid>`)
            return {int(m.name.rsplit("-", 1)[1]) for m in (out / ".actors").glob("*")}

        _wait_for(lambda: images() >= 4, proc, 300, "image from the head's actor")
        made_before_join = images()
        subprocess.run(
            [ray_bin, "start", f"--address={address}", f"--temp-dir={node_temp}", *common],
            check=True,
            env=env,
            capture_output=True,
        )
        # the pool grows: an actor starts in one of the new node's worker processes
        _wait_for(lambda: markers() & _node_pids(node_temp), proc, 180, "actor on the joined node")
        # both actors work until six batches are left (those in the actors' hands and a few queued), then
        # the node goes away, its actor busy: what it had in hand must be made again elsewhere
        _wait_for(lambda: images() >= len(requested) - 24, proc, 300, "images made by the two-node pool")
        _kill_node(node_temp)
        assert proc.poll() is None, "the node was removed after the run"
        made_before_loss = images()
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-3000:]
        assert made_before_join < made_before_loss < len(requested)
        # the driver saw the node come and go
        assert "1 node(s) joined the cluster during the run" in log, log[-3000:]
        assert "1 node(s) left the cluster during the run" in log, log[-3000:]
        manifest = pq.read_table(out / "manifest.parquet").to_pandas()
        files = sorted(p.name for p in out.glob("*.png") if p.name != "contact_sheet.png")
        assert manifest["file"].is_unique and sorted(manifest["file"]) == files == requested  # each image once
        for row in manifest.itertuples():  # and each file is the one its writer recorded
            data = (out / row.file).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (row.bytes, row.sha256), row.file
        assert not list(out.glob(".*.tmp"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        for temp in (node_temp, head_temp):
            _kill_node(temp)
            shutil.rmtree(temp, ignore_errors=True)


def test_nodes_that_came_and_went_are_logged(caplog):
    from medisyn.infer.generate import log_node_changes

    before = {"head": True, "gone-earlier": False, "lost": True}
    after = {"head": True, "gone-earlier": False, "lost": False, "joined": True, "joined-and-lost": False}
    with caplog.at_level("INFO", logger="medisyn.infer.generate"):
        log_node_changes("s", before, after, made=8, todo=8)
    joined, left = (r.getMessage() for r in caplog.records)
    assert joined == "generate s: 2 node(s) joined the cluster during the run: ['joined', 'joined-and-lost']"
    assert left.startswith("generate s: 2 node(s) left the cluster during the run: ['lost', 'joined-and-lost']")
    assert left.endswith("(8 of 8 images made)") and caplog.records[1].levelname == "WARNING"
    caplog.clear()
    log_node_changes("s", before, before, made=8, todo=8)  # a steady cluster: nothing said
    assert not caplog.records


def test_conditioning_sizes_come_from_the_export_or_the_config(tmp_path):

    from medisyn.infer.generate import conditioning_sizes
    from medisyn.records import conditioning_size

    model = tmp_path / "model"
    model.mkdir()
    recorded = {"dermoscopy": [450, 600], "*": [300, 300]}
    (model / "medisyn.json").write_text(json.dumps({"checkpoint": "epoch-001", "original_sizes": recorded}))
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={tmp_path}"])
    sizes = conditioning_sizes(cfg, model)
    assert conditioning_size(sizes, "dermoscopy", 64) == (450, 600)
    assert conditioning_size(sizes, "fundoscopy", 64) == (300, 300)  # a type the corpus lacked: all images
    fixed = load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={tmp_path}", "generate.original_size=[512,384]"])
    assert conditioning_size(conditioning_sizes(fixed, model), "dermoscopy", 64) == (512, 384)
    with pytest.raises(ConfigError, match="generate.original_size"):
        load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={tmp_path}", "generate.original_size=[512]"])


def test_a_set_is_known_by_its_content_not_its_path(tmp_path):
    """A Ray job runs from a new temporary copy of the project each time: the same prompt file in
    another folder is the same set, a changed one is not."""
    import shutil

    from medisyn.infer.generate import prompt_set_identity

    here = load_prompt_set("memorization")
    moved = tmp_path / "elsewhere" / "memorization.yaml"
    moved.parent.mkdir()
    shutil.copy(here.source, moved)
    assert prompt_set_identity(load_prompt_set(str(moved))) == prompt_set_identity(here)
    moved.write_text(moved.read_text().replace("count: 500", "count: 400", 1))
    assert prompt_set_identity(load_prompt_set(str(moved))) != prompt_set_identity(here)

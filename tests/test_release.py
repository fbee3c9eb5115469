"""`medisyn release`: the policy refuses what it must, planted copies never leave, the release loads."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from medisyn.config import ConfigError, load_config


def _png(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


# --- config ---


@pytest.mark.parametrize(
    ("override", "ok"),
    [
        ("release.set=memorization", True),
        ("release.set=../x", False),
        ("release.name=shared-v1", True),
        ("release.name=a/b", False),
        ("release.require=[memorization, fidelity]", True),
        ("release.require=[]", True),
        ("release.require=[utility]", False),
        ("release.max_flag_rate=0.0", True),
        ("release.max_flag_rate=1.5", False),
        ("release.min_fidelity=0.8", True),
        ("release.min_fidelity=-0.1", False),
        ("release.on_flagged=refuse", True),
        ("release.on_flagged=ignore", False),
        ("release.max_gap=0.5", True),
        ("release.max_gap=-1", False),
        ("release.shard_rows=1", True),
        ("release.shard_rows=0", False),
        ("release.licence=CC-BY-NC-4.0", True),
        ("release.intended_use=benchmarking", True),
        ("release.intended_use=", False),
    ],
)
def test_every_release_option_is_checked(override, ok):
    if ok:
        import yaml

        key, value = override.split("=", 1)
        want = yaml.safe_load(value)
        got = getattr(load_config(None, [override]).release, key.split(".")[1])
        assert got == (tuple(want) if isinstance(want, list) else want)
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [override])


def test_the_demo_releases_its_memorization_set_and_the_default_releases_nothing(tmp_path, capsys):
    from medisyn.release.stage import run

    assert load_config("jobs/configs/demo.yaml").release.set == "memorization"
    assert run(load_config(None, [f"run_dir={tmp_path}"])) == {}
    assert "nothing to release" in capsys.readouterr().out and not (tmp_path / "release").exists()


def test_an_image_is_inspected_as_ingest_names_its_pixels():
    from medisyn.release.stage import inspect_image

    grey = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    ingest_id = hashlib.sha256(grey.tobytes() + str(grey.shape).encode()).hexdigest()[:32]  # ingest's worker
    assert inspect_image(_png(grey)) == (True, [ingest_id])
    ok, ids = inspect_image(_png(np.stack([grey] * 3, axis=-1)))  # a grey image saved as RGB is still found
    assert ok and ingest_id in ids
    noisy = _png(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    assert inspect_image(noisy)[0] and inspect_image(noisy[: len(noisy) // 2]) == (False, [])  # truncated
    assert inspect_image(b"not an image") == (False, [])


# --- policy, on a run built by hand (no Ray: refusal comes before any work) ---


def _hand_run(run_dir, n: int = 4) -> dict:
    """A corpus shard and a synthetic set ``s`` of n images, in the real formats; returns its identities."""
    from medisyn import storage
    from medisyn.records import CORPUS_SCHEMA, MANIFEST_SCHEMA, corpus_identity, set_identity

    rng = np.random.default_rng(0)
    row = {"caption": "c", "specialty": "dermatology", "image_type": "dermoscopy", "labels": ["melanoma"],
           "patient_id": "p", "split": "train", "source": "isic2019", "source_ref": "isic2019/0", "series": "s",
           "original_size": [32, 32], "crop_top_left": [0, 0]}  # fmt: skip
    corpus = [{**row, "id": f"r{i}", "image": _png(rng.integers(0, 255, (32, 32, 3), np.uint8))} for i in range(3)]
    storage.write_table(pa.Table.from_pylist(corpus, CORPUS_SCHEMA), run_dir / "corpus" / "c-0.parquet")
    out = run_dir / "synthetic" / "s"
    out.mkdir(parents=True)
    manifest = []
    for i in range(n):
        (out / f"s{i}.png").write_bytes(_png(rng.integers(0, 255, (32, 32, 3), np.uint8)))
        manifest.append({"id": f"s{i}", "file": f"s{i}.png", "prompt": "p", "specialty": "dermatology",
                         "image_type": "dermoscopy", "labels": ["melanoma"], "seed": i, "index": i,
                         "checkpoint": "epoch-000", "guidance_scale": 3.0, "steps": 2, "scheduler": "euler",
                         "original_size": [32, 32]})  # fmt: skip
    storage.write_table(pa.Table.from_pylist(manifest, MANIFEST_SCHEMA), out / "manifest.parquet")
    return {"set": set_identity(out), "corpus": corpus_identity(run_dir / "corpus")}


def _memorization_record(run_dir, identity: dict, flagged: int = 0, pairs: int = 4) -> None:
    summary = {
        "threshold": 0.15,
        "by_kind": {"synthetic:s": {"overall": {"pairs": pairs, "flagged": flagged}, "by_specialty": {}}},
        "inputs": {"sets": {"s": identity["set"]}, "corpus": identity["corpus"]},
    }
    folder = run_dir / "audit" / "memorization"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "pairs.parquet").write_bytes(b"")  # present; the policy does not read it


def test_a_release_without_a_finished_memorization_audit_is_refused_naming_it(tmp_path):
    from medisyn.release.stage import ReleaseRefused, run

    _hand_run(tmp_path)
    cfg = load_config(None, [f"run_dir={tmp_path}", "release.set=s", "release.require=[memorization, fidelity]"])
    with pytest.raises(ReleaseRefused) as exc:
        run(cfg)
    assert "memorization audit has not finished" in str(exc.value)
    assert "fidelity audit has not finished" in str(exc.value)
    assert not (tmp_path / "release").exists()  # refused before anything was written


def test_a_stale_audit_is_refused(tmp_path):
    from medisyn.release.stage import ReleaseRefused, run

    identity = _hand_run(tmp_path)
    cfg = load_config(None, [f"run_dir={tmp_path}", "release.set=s"])
    _memorization_record(tmp_path, {**identity, "set": "another-set"})
    with pytest.raises(ReleaseRefused, match="stale: it saw other images of set 's'"):
        run(cfg)
    _memorization_record(tmp_path, {**identity, "corpus": "another-corpus"})
    with pytest.raises(ReleaseRefused, match="stale: it ran on another corpus"):
        run(cfg)
    assert not (tmp_path / "release").exists()


def test_every_policy_breach_is_named_at_once(tmp_path):
    from medisyn.release.stage import ReleaseRefused, run

    identity = _hand_run(tmp_path)
    _memorization_record(tmp_path, identity, flagged=1, pairs=4)
    fidelity = {
        "sets": {"s": {"specialty": {"share": 0.5, "by_label": {"dermatology": {"n": 4, "share": 0.5}}}}},
        "inputs": {"sets": {"s": identity["set"]}, "corpus": identity["corpus"]},
    }
    (tmp_path / "audit" / "fidelity.json").write_text(json.dumps(fidelity))
    args = [f"run_dir={tmp_path}", "release.set=s", "release.on_flagged=refuse", "release.min_fidelity=0.8"]
    with pytest.raises(ReleaseRefused) as exc:
        run(load_config(None, [*args, "release.max_gap=0.1"]))
    message = str(exc.value)
    assert "flag rate 25.00% (1 of 4) is above release.max_flag_rate 5.00%" in message
    assert "1 image(s) flagged" in message and "release.on_flagged is refuse" in message
    assert "prompt fidelity of dermatology is 50% of 4 images, below release.min_fidelity 80%" in message
    assert "records no guidance_gap" in message
    with pytest.raises(ReleaseRefused) as exc:  # within every bound but on_flagged: only that is named
        run(load_config(None, [*args, "release.max_flag_rate=0.5", "release.min_fidelity=0.5"]))
    assert str(exc.value).count("\n  - ") == 1 and "on_flagged" in str(exc.value)


# --- the stage on a real audit of planted copies (one audit for every test below) ---


def _shifted(px: np.ndarray) -> np.ndarray:
    return np.roll(px, 2, axis=1)


def _jpeg_png(px: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def audited(ingested, tmp_path_factory):
    """A copy of the ingested run with set ``shared``: planted copies of train images (the stored bytes
    themselves, JPEG re-encoded to PNG, shifted by 2 pixels), random images, one image the audit does not
    look at and one with a high guidance gap; then the memorization audit on it."""
    from medisyn.audit.memorization import run as audit
    from medisyn.records import MANIFEST_SCHEMA, atomic_write_table, read_corpus

    base, source_dir, _ = ingested
    run_dir = tmp_path_factory.mktemp("release-run")
    for folder in ("corpus", "rejects", "audit/memorization/embeddings/real"):  # the real embeddings: not redone
        if (source_dir / folder).is_dir():
            shutil.copytree(source_dir / folder, run_dir / folder)
    cfg = load_config(
        base.config_path,
        [
            f"run_dir={run_dir}",
            f"ingest.sources_root={base.ingest.sources_root}",
            "phantoms.enabled=false",
            "audit_memorization.sets=[shared]",
            "audit_memorization.control_queries=20",
            "audit_memorization.images_per_prompt=1",
            "release.set=shared",
            "release.max_flag_rate=1.0",
            "release.max_gap=0.5",
        ],
    )
    rng = np.random.default_rng(0)
    train = read_corpus(run_dir / "corpus", ["id", "image", "specialty", "image_type"], split="train").to_pylist()
    sources = [r for r in train if r["image_type"] in ("dermoscopy", "fundoscopy", "endoscopy")][::9][:3]
    out = run_dir / "synthetic" / "shared"
    out.mkdir(parents=True)
    rows, plants = [], {}

    def add(image_id, data, src, prompt, index=0, gap=0.1):
        (out / f"{image_id}.png").write_bytes(data)
        rows.append({"id": image_id, "file": f"{image_id}.png", "prompt": prompt, "specialty": src["specialty"],
                     "image_type": src["image_type"], "labels": ["x"], "seed": len(rows), "index": index,
                     "checkpoint": "epoch-000", "guidance_scale": 3.0, "steps": 2, "scheduler": "euler",
                     "original_size": [64, 64], "guidance_gap": gap})  # fmt: skip

    for n, (src, how) in enumerate(zip(sources, ("bytes", "jpeg", "shift"), strict=True)):
        px = np.asarray(Image.open(io.BytesIO(src["image"])).convert("RGB"))
        data = src["image"] if how == "bytes" else _png(_jpeg_png(px) if how == "jpeg" else _shifted(px))
        add(f"plant-{how}", data, src, f"plant {n}")
        plants[f"plant-{how}"] = src["id"]
        add(f"clean{n}", _png(rng.integers(0, 256, (128, 128, 3), np.uint8)), src, f"clean {n}")
    add("unaudited", _png(rng.integers(0, 256, (128, 128, 3), np.uint8)), sources[0], "clean 0", index=1)
    add("gappy", _png(rng.integers(0, 256, (128, 128, 3), np.uint8)), sources[1], "gappy", gap=0.9)
    schema = MANIFEST_SCHEMA if "guidance_gap" in MANIFEST_SCHEMA.names else MANIFEST_SCHEMA.append(
        pa.field("guidance_gap", pa.float64())
    )  # fmt: skip
    atomic_write_table(pa.Table.from_pylist(rows, schema), out / "manifest.parquet")
    summary = audit(cfg)
    return cfg, summary, plants


def _release_images(folder) -> list[bytes]:
    import pyarrow.parquet as pq

    out = []
    for shard in sorted((folder / "data").glob("*.parquet")):
        out += [x["bytes"] for x in pq.read_table(shard, columns=["image"]).column("image").to_pylist()]
    return out


@pytest.mark.ray
def test_planted_copies_are_left_out_and_listed_and_the_release_loads(audited, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from medisyn.records import read_corpus
    from medisyn.release.stage import run

    cfg, summary, plants = audited
    assert summary["by_kind"]["synthetic:shared"]["overall"]["flagged"] >= 2  # the audit saw the copies
    record = run(cfg)
    root = cfg.run_path / "release"
    left = {r["id"]: r for r in pq.read_table(root / "shared.left_out.parquet").to_pylist()}
    assert set(plants) <= set(left)  # every planted copy left out, and listed
    assert left["plant-bytes"]["reason"] == "identical to a corpus image"
    assert {left[i]["reason"] for i in plants} <= {"identical to a corpus image", "flagged by distance"}
    assert left["unaudited"]["reason"] == "not audited" and left["gappy"]["reason"] == "over max_gap"
    assert not any(i.startswith("clean") for i in left)
    assert record["rows"] == 3 and record["left_out"] == dict(
        __import__("collections").Counter(r["reason"] for r in left.values())
    )
    # no corpus image in the release, by the hash of its bytes and of its pixels
    corpus = read_corpus(cfg.run_path / "corpus", ["image"]).column("image").to_pylist()
    released = _release_images(root / "shared")
    assert not {hashlib.sha256(b).digest() for b in corpus} & {hashlib.sha256(b).digest() for b in released}
    pixels = lambda b: hashlib.sha256(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).tobytes()).digest()  # noqa: E731
    assert not {pixels(b) for b in corpus} & {pixels(b) for b in released}
    # no matched real image's id reaches a row, the card or the record
    shard = pq.read_table(next((root / "shared" / "data").glob("*.parquet")))
    assert "match_id" not in shard.column_names
    text = (root / "shared" / "README.md").read_text() + (root / "shared.json").read_text()
    assert not any(p in text for p in plants.values())
    # the card's count, datasets' rows and Image features agree, offline
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset(
        "parquet", data_dir=str(root / "shared" / "data"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(ds.features["image"], datasets.Image) and ds[0]["image"].size[0] > 0
    assert len(ds) == record["rows"] and f"\n{len(ds)} synthetic images" in (root / "shared" / "README.md").read_text()
    assert sorted(ds["id"]) == ["clean0", "clean1", "clean2"]
    readme = (root / "shared" / "README.md").read_text()
    assert "euler scheduler, 2 steps, guidance scale 3;" in readme  # as the manifest records it, not the config
    header = readme.split("---")[1]
    meta = __import__("yaml").safe_load(header)
    assert meta["task_categories"] == ["text-to-image", "image-classification"] and meta["license"] == "other"
    assert meta["size_categories"] == ["n<1K"] and meta["configs"][0]["data_files"][0]["split"] == "train"
    # the Croissant card validates
    import mlcroissant as mlc

    croissant = mlc.Dataset(jsonld=str(root / "shared" / "croissant.json"))
    assert not croissant.metadata.ctx.issues.errors and not croissant.metadata.ctx.issues.warnings
    records = list(croissant.records("default"))  # its FileSet and RecordSet read the shards
    assert len(records) == record["rows"] and all(r["default/image"].size[0] > 0 for r in records)
    data = json.loads((root / "shared" / "croissant.json").read_text())
    for key in ("rai:dataCollection", "rai:dataBiases", "rai:personalSensitiveInformation", "rai:dataUseCases"):
        assert data[key], key


@pytest.mark.ray
def test_a_second_release_does_nothing_and_a_changed_input_releases_anew(audited, capsys):
    import dataclasses

    from medisyn.release.stage import ReleaseRefused, run

    cfg, _, _ = audited
    first = run(cfg)
    root = cfg.run_path / "release"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run(cfg) == first and "already released" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    smaller = dataclasses.replace(cfg, release=dataclasses.replace(cfg.release, shard_rows=1))
    again = run(smaller)  # another setting: released anew, the folder replaced whole
    shards = sorted(p.name for p in (root / "shared" / "data").iterdir())
    assert again["rows"] == first["rows"] and shards == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    image = cfg.run_path / "synthetic" / "shared" / "clean0.png"
    data = image.read_bytes()
    image.write_bytes(data + b"\0")  # one image is not what the audit saw: stale, refused
    try:
        with pytest.raises(ReleaseRefused, match="stale"):
            run(smaller)
    finally:
        image.write_bytes(data)

"""The memorization audit: the patch distance, exact sharded search, the statistics, and planted copies."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from medisyn.audit.neighbours import patch_distance, shards, topk_search
from medisyn.audit.stats import clopper_pearson_upper, closer_than_control, tail_summary, wilcoxon_above


def test_patch_distance_is_a_normalised_worst_patch():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert patch_distance(a, a) == 0.0
    assert patch_distance(a, b) == pytest.approx(patch_distance(b, a))
    black, white = np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8)
    assert patch_distance(black, white) == pytest.approx(1.0)
    c = a.copy()
    c[:16, :16] = 0  # one patch changed: its distance, by hand, is the result
    by_hand = np.sqrt((a[:16, :16].astype(float) ** 2).sum() / (255.0**2 * 16 * 16 * 3))
    assert patch_distance(a, c) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="shapes differ"):
        patch_distance(a, a[:32])


def test_sharded_search_equals_unsharded_and_brute_force():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = keys[:100] + 0.01 * rng.standard_normal((100, 32)).astype(np.float32)
    s1, i1 = topk_search(q, shards(keys, 3000), 20)
    s2, i2 = topk_search(q, shards(keys, 701), 20, block=97)
    brute = np.argsort(-(q @ keys.T), axis=1, kind="stable")[:, :20]
    assert (i1 == i2).all() and (i1 == brute).all()
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    _, loo = topk_search(keys[:100], shards(keys, 500), 5, exclude=np.arange(100))
    assert not (loo == np.arange(100)[:, None]).any()  # left out of its own search
    # exact ties (duplicated keys) across the k-th place: the lowest indices win, however sharded
    small = rng.integers(-3, 4, (40, 8)).astype(np.float32)  # integer products: ties are exact in any blocking
    dup = np.repeat(small, 6, axis=0)[rng.permutation(240)]
    for k in (1, 4, 9):
        brute = np.lexsort((np.broadcast_to(np.arange(240), (40, 240)), -(small @ dup.T)), axis=1)[:, :k]
        for size, block in ((240, 4096), (50, 7)):
            assert (topk_search(small, shards(dup, size), k, block=block)[1] == brute).all(), (k, size)


def test_read_rows_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from medisyn.records import read_rows

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [f"i{i}" for i in range(23)], "image": [bytes([i]) for i in range(23)]}), path,
                   row_group_size=5)  # fmt: skip
    read, original = [], pq.ParquetFile.read_row_groups

    def spy(self, groups, **kw):
        read.append(groups)
        return original(self, groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    for rows in ([0], [22], [4, 5, 6], [3, 17, 18, 21], list(range(23))):
        assert read_rows(str(path), rows) == {f"i{r}": bytes([r]) for r in rows}, rows
    assert read[:4] == [[0], [4], [0, 1], [0, 3, 4]]


def _unit(rng, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_search_task_reads_only_its_groups_partition(tmp_path, monkeypatch):
    """The real store is split by (specialty, image type): a search reads its group's parts, never
    another group's (at 1M x 512 float32 the whole store is ~2 GB per task), and finds what brute
    force over its group's train images finds (the group's test images are no keys)."""
    from medisyn import storage
    from medisyn.audit.embeddings import EMBEDDING_SCHEMA, _split_by_group, group_name
    from medisyn.audit.memorization import search_group
    from medisyn.records import atomic_write_table

    rng = np.random.default_rng(0)
    kinds = {"a": ("dermatology", "dermoscopy"), "b": ("radiology", "chest x-ray")}
    groups = {f"{g}{i:03d}": kinds[g] for g in kinds for i in range(60)}
    ids = sorted(groups)
    vectors = _unit(rng, len(ids))
    real = tmp_path / "real"
    for part in range(3):  # three batches, as embed writes them: each split by group
        rows = pa.table({"id": ids[part::3], "embedding": list(vectors[part::3])}, EMBEDDING_SCHEMA)
        for g, table in _split_by_group(rows, groups).items():
            atomic_write_table(table, real / g / f"part-{part}.parquet")
    group = group_name(*kinds["a"])
    train = [i for i in ids if i.startswith("a") and int(i[1:]) < 50]  # a050..a059: the group's test images
    queries = ["a050", "a051", "a002"]
    read, original = [], storage.read_table
    monkeypatch.setattr(
        storage, "read_table", lambda path, *a, **kw: read.append(str(path)) or original(path, *a, **kw)
    )
    found = search_group(str(real), group, train, str(real), queries, 5, False, 7)
    assert read and all(f"/{group}/" in p for p in read), read
    assert {p.rsplit("/", 1)[-1] for p in read} == {f"part-{i}.parquet" for i in range(3)}
    index = {i: n for n, i in enumerate(ids)}
    keys = np.stack([vectors[index[i]] for i in train])
    for q, got in zip(queries, found, strict=True):
        brute = [train[j] for j in np.argsort(-(keys @ vectors[index[q]]), kind="stable")[:5]]
        assert got == brute, q


def test_the_embedder_actor_gets_preprocessed_pixels_and_decodes_nothing(monkeypatch):
    """CPU tasks decode and preprocess (``preprocess_images``); the actor runs the network only."""
    import PIL.Image
    import torch

    from medisyn.audit.embeddings import Embedder, preprocess_images

    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    embedder = Embedder("tiny-embedder")
    batch = preprocess_images({"id": np.array(["x", "y", "z"]), "image": images}, embedder.preprocess)
    assert set(batch) == {"id", "pixels"} and batch["pixels"].dtype == np.float32
    side = batch["pixels"].shape[-1]
    assert batch["pixels"].shape == (3, 3, side, side)
    for data, pixels in zip(images, batch["pixels"], strict=True):
        np.testing.assert_array_equal(pixels, embedder.preprocess(Image.open(io.BytesIO(data)).convert("RGB")).numpy())

    def no_decoding(*args, **kwargs):
        raise AssertionError("the actor decoded an image")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    out = embedder(batch)
    assert list(out["id"]) == ["x", "y", "z"]
    e = np.stack(out["embedding"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        direct = embedder.model.encode_image(torch.from_numpy(batch["pixels"]), normalize=True).numpy()
    np.testing.assert_allclose(e, direct, rtol=1e-5, atol=1e-6)


def test_flags_are_counted_per_ct_series_and_by_dropped_duplicates():
    from medisyn.audit.memorization import summarize

    def pair(i, d, series=None, dups=0):
        return {"kind": "synthetic:s", "id": f"q{i}", "specialty": "radiology", "image_type": "x", "match_id": f"m{i}",
                "distance": d, "relative_distance": 1.0, "embedding_rank": 0, "flagged": d <= 0.15,
                "match_near_duplicates": dups, "match_series": series}  # fmt: skip

    pairs = [pair(0, 0.1, "ct/a"), pair(1, 0.12, "ct/a"), pair(2, 0.3, "ct/b"), pair(3, 0.05, None, 2), pair(4, 0.4)]
    entry = summarize(pairs, 0.15)["by_kind"]["synthetic:s"]
    assert entry["by_series"] == {"pairs": 3, "series_matched": 2, "flagged": 2, "series_with_flagged": 1,
                                  "most_flagged_in_one_series": 2}  # fmt: skip
    assert entry["by_match_near_duplicates"] == {
        "0": {"pairs": 4, "flagged": 2, "flagged_pct": 50.0},
        "2+": {"pairs": 1, "flagged": 1, "flagged_pct": 100.0},
    }


def test_tail_statistics_on_a_small_case():
    d = np.array([0.1, 0.3, 0.35, 0.4, 0.5, 0.45, 0.38, 0.41, 0.33, 0.36])
    t = tail_summary(d, 0.15)
    assert t["pairs"] == 10 and t["flagged"] == 1 and t["flagged_pct"] == 10.0 and t["min"] == 0.1
    assert t["flagged_rate_upper95"] == pytest.approx(clopper_pearson_upper(1, 10))
    assert clopper_pearson_upper(0, 1000) == pytest.approx(0.002991, abs=1e-5)  # the "rule of three"
    assert wilcoxon_above(np.full(50, 0.4) + np.linspace(0, 0.01, 50)) < 1e-6
    assert closer_than_control(np.full(30, 0.05), np.linspace(0.3, 0.5, 30)) < 1e-6
    assert closer_than_control(np.linspace(0.3, 0.5, 30), np.linspace(0.3, 0.5, 30)) > 0.3


def _png(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def _altered(px: np.ndarray, how: str, rng) -> np.ndarray:
    if how == "exact":
        return px
    if how == "noise":
        return np.clip(px.astype(float) + rng.normal(0, 3, px.shape), 0, 255).astype(np.uint8)
    if how == "shift":
        return np.roll(px, 1, axis=1)
    if how == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="JPEG", quality=90)
        return np.asarray(Image.open(buf).convert("RGB"))
    if how == "brighter":
        return np.clip(px.astype(int) + 6, 0, 255).astype(np.uint8)
    raise ValueError(how)


@pytest.fixture(scope="module")
def planted(ingested):
    """A synthetic set of altered copies of train images plus clean images, then the audit."""
    from medisyn.audit.memorization import run as audit
    from medisyn.config import load_config
    from medisyn.records import MANIFEST_SCHEMA, atomic_write_table, read_corpus

    base, run_dir, _ = ingested
    cfg = load_config(
        base.config_path,
        [
            f"run_dir={run_dir}",
            f"ingest.sources_root={base.ingest.sources_root}",
            "phantoms.enabled=false",
            "audit_memorization.sets=[planted]",
            "audit_memorization.control_queries=40",
        ],
    )
    rng = np.random.default_rng(0)
    train = read_corpus(run_dir / "corpus", ["id", "image", "specialty", "image_type"], split="train").to_pylist()
    out = run_dir / "synthetic/planted"
    out.mkdir(parents=True, exist_ok=True)
    rows, plants = [], {}
    sources = [r for r in train if r["image_type"] in ("dermoscopy", "fundoscopy", "endoscopy")][::7][:10]
    for n, src in enumerate(sources):
        px = np.asarray(Image.open(io.BytesIO(src["image"])).convert("RGB").resize((128, 128), Image.LANCZOS))
        how = ["exact", "noise", "shift", "jpeg", "brighter"][n % 5]
        for kind, pixels in (("plant", _altered(px, how, rng)), ("clean", rng.integers(0, 256, px.shape, np.uint8))):
            image_id = f"{kind}{n:02d}"
            (out / f"{image_id}.png").write_bytes(_png(pixels))
            rows.append({"id": image_id, "file": f"{image_id}.png", "prompt": f"p{n}", "specialty": src["specialty"],
                         "image_type": src["image_type"], "labels": [], "seed": n, "index": 0, "checkpoint": "-",
                         "guidance_scale": 7.0, "steps": 1, "scheduler": "euler", "original_size": [9, 9]})  # fmt: skip
            if kind == "plant":
                plants[image_id] = (src["id"], how)
    atomic_write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA), out / "manifest.parquet")
    return cfg, audit(cfg), plants


@pytest.mark.ray
def test_every_planted_copy_is_flagged_and_clean_images_are_not(planted):
    import pyarrow.parquet as pq

    cfg, summary, plants = planted
    pairs = pq.read_table(cfg.run_path / "audit/memorization/pairs.parquet").to_pylist()
    synthetic = {p["id"]: p for p in pairs if p["kind"] == "synthetic:planted"}
    for image_id, (source, how) in plants.items():
        assert synthetic[image_id]["flagged"], (how, synthetic[image_id])
        assert synthetic[image_id]["match_id"] == source, how
    assert not any(p["flagged"] for i, p in synthetic.items() if i.startswith("clean"))
    s = summary["by_kind"]["synthetic:planted"]
    assert s["overall"]["flagged"] == len(plants) and s["overall"]["pairs"] == 2 * len(plants)
    assert s["p_closer_than_test_control"] < 0.5 or s["overall"]["min"] == 0.0
    assert {"control:test", "control:train-loo"} <= set(summary["by_kind"])
    share = summary["by_caption_share"]["synthetic:planted"]  # every pair binned by its match's caption share
    assert sum(b["pairs"] for b in share.values()) == s["overall"]["pairs"]
    assert sum(b["flagged"] for b in share.values()) == len(plants)
    loo = [p for p in pairs if p["kind"] == "control:train-loo"]
    assert loo and all(p["id"] != p["match_id"] for p in loo)  # left out of its own search
    out = cfg.run_path / "audit/memorization"
    assert (out / "gallery.png").stat().st_size > 1000 and (out / "histograms.png").exists()


@pytest.mark.ray
def test_a_copy_outside_the_embeddings_top1_is_found_by_the_pixels(planted, tmp_path):
    """Re-ranking: the plant's embedding points at another image first, its source is within top-k."""
    import pyarrow.parquet as pq

    from medisyn.audit.embeddings import EMBEDDING_SCHEMA, embeddings_dir, group_name, read_embeddings
    from medisyn.audit.memorization import find_matches
    from medisyn.records import corpus_index, read_corpus

    cfg, _, plants = planted
    image_id, (source, _) = next(iter(plants.items()))
    row = read_corpus(cfg.run_path / "corpus", ["id", "specialty", "image_type"], ids=[source]).to_pylist()[0]
    group = read_corpus(cfg.run_path / "corpus", ["id", "specialty", "image_type"], split="train").to_pylist()
    train_ids = [r["id"] for r in group if (r["specialty"], r["image_type"]) == (row["specialty"], row["image_type"])]
    decoy = next(i for i in train_ids if i != source)
    vector = read_embeddings(embeddings_dir(cfg, "real"), [decoy])[decoy]
    (tmp_path / "q" / group_name(row["specialty"], row["image_type"])).mkdir(parents=True)
    pq.write_table(pa.table({"id": [image_id], "embedding": [vector]}, EMBEDDING_SCHEMA),
                   tmp_path / "q" / group_name(row["specialty"], row["image_type"]) / "part-0.parquet")  # fmt: skip
    job = {
        "kind": "decoy",
        "queries": [{"id": image_id, "specialty": row["specialty"], "image_type": row["image_type"]}],
        "train_ids": train_ids,
        "query_dir": tmp_path / "q",  # its embedding's top-1 is now the decoy
        "paths": {image_id: str(cfg.run_path / f"synthetic/planted/{image_id}.png")},
        "leave_one_out": False,
    }
    (found,) = find_matches(cfg, [job], corpus_index(cfg.run_path / "corpus"))
    assert found["match_id"] == source and found["embedding_rank"] > 0 and found["distance"] <= 0.15


@pytest.mark.ray
def test_embeddings_are_parts_and_a_rerun_embeds_only_what_is_missing(planted):
    import pyarrow.parquet as pq

    from medisyn.audit.embeddings import embed, embeddings_dir, files_source, group_name, parts, stored_ids
    from medisyn.records import read_manifest

    cfg, summary, _ = planted
    folder = embeddings_dir(cfg, "synthetic-planted")
    manifest = read_manifest(cfg.run_path / "synthetic/planted", ["id", "specialty", "image_type"]).to_pylist()
    groups = {r["id"]: (r["specialty"], r["image_type"]) for r in manifest}
    ids = sorted(stored_ids(folder))
    before = parts(folder)
    assert ids == sorted(groups) and before
    # one folder per (specialty, image type), each part within its group's
    assert {p.parent.name for p in before} == {group_name(*g) for g in groups.values()}
    for p in before:
        assert {group_name(*groups[i]) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()} == {
            p.parent.name
        }
    embed(cfg, "synthetic-planted", groups, files_source(cfg.run_path / "synthetic/planted"))
    assert parts(folder) == before  # nothing missing: nothing embedded, nothing rewritten
    lost = set(pq.read_table(before[0], columns=["id"]).column("id").to_pylist())
    before[0].unlink()
    embed(cfg, "synthetic-planted", groups, files_source(cfg.run_path / "synthetic/planted"))
    (new,) = set(parts(folder)) - set(before)
    assert set(pq.read_table(new, columns=["id"]).column("id").to_pylist()) == lost and stored_ids(folder) == set(ids)
    assert new.parent == before[0].parent
    # flag rates by the matched train image's dropped duplicates: the buckets hold every pair
    for entry in summary["by_kind"].values():
        assert sum(b["pairs"] for b in entry["by_match_near_duplicates"].values()) == entry["overall"]["pairs"]


@pytest.mark.ray
def test_near_duplicate_counts_come_from_ingest_rejects(ingested):
    from medisyn.audit.memorization import near_duplicate_counts
    from medisyn.records import read_shards

    _, run_dir, _ = ingested
    counts = near_duplicate_counts(run_dir)
    rejects = read_shards(run_dir / "rejects", ["stage", "reason"]).to_pylist()
    dropped = [r for r in rejects if r["stage"] == "dedup"]
    assert dropped and sum(counts.values()) == len(dropped)
    kept = set(read_shards(run_dir / "corpus", ["source_ref"]).column("source_ref").to_pylist())
    assert set(counts) <= kept  # every count belongs to an image in the corpus


@pytest.mark.ray
def test_a_finished_audit_is_not_redone_unless_its_inputs_change(planted, capsys, monkeypatch):
    """A resubmitted pipeline passes the finished audit (resources may differ); another threshold
    or another image in the set starts the work again."""
    import dataclasses

    import medisyn.audit.memorization as memorization

    cfg, summary, _ = planted
    record = cfg.run_path / "audit/memorization/summary.json"
    stamp = record.stat().st_mtime_ns
    m = cfg.audit_memorization
    fewer_actors = dataclasses.replace(cfg, audit_memorization=dataclasses.replace(m, max_actors=1))
    assert memorization.run(fewer_actors)["by_kind"].keys() == summary["by_kind"].keys()
    assert "already done" in capsys.readouterr().out and record.stat().st_mtime_ns == stamp

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(memorization, "embed", started)
    stricter = dataclasses.replace(cfg, audit_memorization=dataclasses.replace(m, threshold=0.1))
    with pytest.raises(Started):
        memorization.run(stricter)
    image = next((cfg.run_path / "synthetic/planted").glob("clean*.png"))
    data = image.read_bytes()
    image.write_bytes(data + b"\0")  # one image of the set is not what the audit saw
    try:
        with pytest.raises(Started):
            memorization.run(cfg)
    finally:
        image.write_bytes(data)
    assert record.stat().st_mtime_ns == stamp

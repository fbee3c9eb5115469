"""Duplicates: the vectorised near search against brute force and the original loop, the keep
order across repositories, and (Ray) a repository that re-ships another's images loses them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import flat
from PIL import Image

from medisyn.ingest.dedup import (
    find_duplicates,
    find_duplicates_reference,
    near_duplicates,
    near_duplicates_in_files,
    parse_phashes,
)
from medisyn.ingest.dedup_bench import clustered

ROOT = Path(__file__).resolve().parents[1]


def _brute_force(h: np.ndarray, thumbs: np.ndarray | None, k: int, max_rms: float) -> np.ndarray:
    """All pairs at once (numpy), then the keep-order rule: drop ``i`` if it matches a kept earlier image."""
    n = len(h)
    ok = np.bitwise_count(h[:, None] ^ h[None, :]) <= k
    if thumbs is not None:
        t = thumbs.astype(np.float64)
        sq = (t * t).sum(1)
        ss = sq[:, None] + sq[None, :] - 2 * (t @ t.T)  # exact: integers far below 2**53
        ok &= np.sqrt(np.maximum(ss, 0) / t.shape[1]) / 255 <= max_rms
    match, kept = np.full(n, -1), np.zeros(n, bool)
    for i in range(n):
        earlier = np.flatnonzero(ok[i, :i] & kept[:i])
        if len(earlier):
            match[i] = earlier[0]
        else:
            kept[i] = True
    return match


@pytest.mark.parametrize(
    "k, max_rms, block",
    [(4, 0.01, 1024), (4, 0.01, 97), (4, 0.07, 256), (8, 0.05, 64), (2, 0.2, 1000), (4, None, 128)],
)
def test_near_duplicates_equal_brute_force(k, max_rms, block):
    """On 3,000 clustered hashes (150 per cluster) the indexed search drops the same images for
    the same kept ones as comparing all pairs; loose limits make long chains of matches."""
    data = clustered(3000, bases=20, seed=k)
    h = parse_phashes(data["phashes"])
    thumbs = None if max_rms is None else data["thumbs"]
    expected = _brute_force(h, thumbs, k, max_rms)
    got = near_duplicates(h, k, thumbs, max_rms if max_rms is not None else 0.01, block=block, limit=5000)
    assert (expected >= 0).sum() > 40  # enough duplicates to mean something
    np.testing.assert_array_equal(got, expected)


def test_find_duplicates_equal_the_original_loop():
    data = clustered(4000, bases=40, seed=1)
    thumbs = [t.tobytes() for t in data["thumbs"]]
    args = (data["refs"], data["ids"], data["phashes"])
    for k in (-1, 0, 4, 6):
        expected = find_duplicates_reference(*args, k, thumbs, 0.01)
        assert find_duplicates(*args, k, data["thumbs"], 0.01) == expected
        assert find_duplicates(*args, k, thumbs, 0.01) == expected
    expected = find_duplicates_reference(*args, 4, None)
    assert find_duplicates(*args, 4, None) == expected
    reasons = {reason for reason, _ in expected.values()}
    assert reasons == {"exact duplicate", "near duplicate"}
    assert find_duplicates([], [], [], 4, [], 0.01) == {}


def test_a_chain_keeps_what_the_keep_order_says():
    """a ≈ b and b ≈ c but a ≉ c: b goes (a was kept first), so c stays — in one block or across blocks."""
    thumbs = np.repeat(np.array([[100], [102], [104]], np.uint8), 1024, axis=1)  # 0.8% apart, a to c 1.6%
    h = np.zeros(3, np.uint64)
    for block in (1, 2, 1024):
        np.testing.assert_array_equal(near_duplicates(h, 4, thumbs, 0.01, block=block), [-1, 0, -1])


def test_the_earliest_repository_keeps_its_copy():
    """Keep order is the repository's rank in the config, then source_ref — not the ref alone."""
    refs = ["b-first/0002", "a-second/0001", "a-second/0003", "b-first/0009"]
    ids = ["x", "x", "y", "z"]
    phashes = ["00ff00ff00ff00ff", "00ff00ff00ff00ff", "00ff00ff00ff00fe", "00ff00ff00ff00fc"]
    thumbs = [bytes([10]) * 1024, bytes([10]) * 1024, bytes([11]) * 1024, bytes([11]) * 1024]
    found = find_duplicates(refs, ids, phashes, 4, thumbs, 0.01, ranks=[0, 1, 1, 0])
    assert found == {
        "a-second/0001": ("exact duplicate", "b-first/0002"),
        "a-second/0003": ("near duplicate", "b-first/0002"),
        "b-first/0009": ("near duplicate", "b-first/0002"),
    }
    # without ranks the refs alone decide
    assert find_duplicates(refs, ids, phashes, 4, thumbs, 0.01)["b-first/0002"] == ("exact duplicate", "a-second/0001")


def test_near_duplicates_in_files_reads_staging_columns(tmp_path):
    """The per-image-type Ray task: staging shards in, only the drops out; exact drops are skipped."""
    schema = pa.schema([("source_ref", pa.string()), ("phash", pa.string()), ("thumb", pa.binary())])
    grey = [bytes([v]) * 1024 for v in (50, 51, 52, 200)]
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"source_ref": "two/1", "phash": "0000000000000000", "thumb": grey[0]},
                {"source_ref": "two/2", "phash": "0000000000000003", "thumb": grey[3]},
            ],
            schema,
        ),
        tmp_path / "u2.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"source_ref": "one/9", "phash": "0000000000000001", "thumb": grey[1]},
                {"source_ref": "one/8", "phash": "0000000000000001", "thumb": grey[2]},
            ],
            schema,
        ),
        tmp_path / "u1.parquet",
    )
    files = [str(tmp_path / "u2.parquet"), str(tmp_path / "u1.parquet")]
    assert near_duplicates_in_files(files, [1, 0], [], 4, 0.01) == {"one/9": "one/8", "two/1": "one/8"}
    assert near_duplicates_in_files(files, [1, 0], ["one/8"], 4, 0.01) == {"two/1": "one/9"}


# --- end to end: a repository that re-ships another's images (ISIC 2019 holds HAM10000) ---


def _reship(phantom_root: Path, out: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A repositories file with the phantom ``isic`` and ``isic-2019``: 6 of isic's images re-encoded
    and renamed (2 PNG: same pixels; 2 JPEG q95 and 2 shrunk by 10%: near), each under a new patient
    and in another split than its original, plus 3 images of its own. Returns it and
    ``{copy path: (kind, original path)}``."""
    doc = yaml.safe_load((phantom_root / "repositories.yaml").read_text())
    (isic,) = [dict(r, path=str(phantom_root / r["path"])) for r in doc["repositories"] if r["name"] == "isic"]
    table = pd.read_csv(phantom_root / "isic" / isic["labels_csv"], dtype=str).set_index(isic["path_column"])
    split_of = table[isic["split_column"]].to_dict()
    planted = {Path(d["path"]).name for d in json.loads((phantom_root / "phantoms.json").read_text())["defects"]}
    files = sorted((phantom_root / "isic/images").glob("*.jpg"))
    digests = Counter(hashlib.sha256(p.read_bytes()).digest() for p in files)
    originals = [p for p in files if p.name not in planted and digests[hashlib.sha256(p.read_bytes()).digest()] == 1][
        :6
    ]  # clean images only: the phantom's own planted duplicate is not the copy under test
    own = sorted((phantom_root / "derm-photos").rglob("*.jpg"))[:3]
    images = out / "isic-2019" / "images"
    images.mkdir(parents=True)
    copies, rows = {}, []
    for i, src in enumerate(originals):
        im = Image.open(src).convert("RGB")
        name = f"images/ISIC_{9_000_000 + i}" + (".png" if i < 2 else ".jpg")
        if i < 2:
            im.save(out / "isic-2019" / name)
        elif i < 4:
            im.save(out / "isic-2019" / name, quality=95)
        else:
            im.resize((im.width * 9 // 10, im.height * 9 // 10), Image.Resampling.LANCZOS).save(
                out / "isic-2019" / name, quality=95
            )
        copies[name] = ("exact" if i < 2 else "near", f"images/{src.name}")
        other = "test" if split_of[f"images/{src.name}"] == "train" else "train"
        rows.append({"image": name, "patient_id": f"Q{i:04d}", "diagnosis": "NV", "split": other})
    for i, src in enumerate(own):
        shutil.copy(src, images / f"ISIC_{9_100_000 + i}.jpg")
        rows.append(
            {"image": f"images/ISIC_{9_100_000 + i}.jpg", "patient_id": f"R{i}", "diagnosis": "MEL", "split": "train"}
        )
    pd.DataFrame(rows).to_csv(out / "isic-2019" / "metadata.csv", index=False)
    again = dict(isic, name="isic-2019", path=str(out / "isic-2019"), glob="images/*", labels_csv="metadata.csv")
    again.update(path_column="image", patient_column="patient_id", label_columns=["diagnosis"], split_column="split")
    repos_file = out / "repositories.yaml"
    repos_file.write_text(yaml.safe_dump({"repositories": [isic, again]}))
    return repos_file, copies


def _thumb_and_phash(image: bytes) -> tuple[bytes, str]:
    thumb = Image.open(io.BytesIO(image)).convert("L").resize((32, 32), Image.Resampling.BOX)
    return thumb.tobytes(), str(imagehash.phash(thumb))


@pytest.mark.ray
def test_a_repository_that_reships_images_loses_exactly_those(ray_cluster, phantom_root, tmp_path):
    from medisyn.config import load_config
    from medisyn.ingest.pipeline import run as ingest

    repos_file, copies = _reship(phantom_root, tmp_path / "src")
    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={run_dir}", *flat(repos_file)])
    summary = ingest(cfg)
    source_map = pq.read_table(run_dir / "private/source_map.parquet").to_pandas()
    ref_of = {(s, p): r for r, s, p in source_map[["source_ref", "source", "path"]].itertuples(index=False)}
    rejects = pd.concat([pq.read_table(f).to_pandas() for f in sorted((run_dir / "rejects").glob("*.parquet"))])
    dedup = rejects[rejects.stage == "dedup"].set_index("source_ref")["reason"].to_dict()
    expected = {
        ref_of["isic-2019", copy]: f"{kind} duplicate of {ref_of['isic', original]}"
        for copy, (kind, original) in copies.items()
    }
    ours = {ref: why for ref, why in dedup.items() if ref.startswith("isic-2019/")}
    assert ours == expected  # the copies, each naming its original in the other repository
    theirs = [why for ref, why in dedup.items() if ref.startswith("isic/")]  # the phantom's planted duplicate
    assert len(theirs) == 1 and theirs[0].startswith("exact duplicate of isic/")
    assert summary["duplicates"] == {"exact duplicate": 3, "near duplicate": 4}

    corpus = pd.concat(
        [pq.read_table(f).to_pandas() for f in sorted((run_dir / "corpus").glob("*.parquet"))], ignore_index=True
    )
    assert corpus["id"].is_unique and corpus["source_ref"].is_unique
    assert (corpus.source == "isic-2019").sum() == 3  # its own images stay
    assert {ref_of["isic", original] for _, original in copies.values()} <= set(corpus.source_ref)
    # no image twice in the corpus, so none in two splits: the corpus itself has no duplicates left
    thumbs, phashes = zip(*(_thumb_and_phash(b) for b in corpus["image"]), strict=True)
    assert find_duplicates(list(corpus.source_ref), list(corpus.id), list(phashes), 4, list(thumbs), 0.01) == {}


def test_bench_dedup_small(capsys):
    """The bench runs at a small scale, reports both timings and that both searches agree (speed is not asserted)."""
    from medisyn.ingest.dedup_bench import run

    r = run(n=3000, reference_n=1000, bases=30)
    assert r["same"] and r["duplicates"] > 0 and r["new_s"] > 0 and r["reference_s"] > 0
    out = capsys.readouterr().out
    assert (
        "extrapolated from 1,000 images" in out and "same duplicates as the reference on the 1,000 both ran: yes" in out
    )

"""The ``release`` stage: only what passed leaves the run, as a dataset others can load.

1. Policy, before anything is written: every audit ``release.require`` names must have finished on
   exactly this set's images and this corpus (their records' ``finished_with`` inputs), the
   memorization audit's own flag rate must not exceed ``max_flag_rate``, every specialty's prompt
   fidelity must reach ``min_fidelity``, and ``on_flagged: refuse`` refuses any flag. Each breach is
   named; none is a :class:`ReleaseRefused` (a ``ConfigError``: the CLI prints it and exits 2).
2. Left out, each with its reason: not decodable, byte- or pixel-identical to a corpus image
   (every corpus image hashed by one Ray task per shard, the set's hashes sent to each: only the
   count and the matches come back), flagged by the memorization audit's distance, guidance gap
   above ``max_gap``, or not among the images the audit looked at (it samples
   ``images_per_prompt``). The list goes to ``release/<name>.left_out.parquet``, beside the
   release, never in it.
3. ``release/<name>/``: ``data/train-0000i-of-0000N.parquet`` (an ``image`` column with Hugging Face
   ``datasets``' own Image feature schema, so ``load_dataset("parquet", data_dir=...)`` gives
   ``Image`` features, and one row of metadata per image; never the matched real image's id, path or
   pixels), ``README.md`` (card) and ``croissant.json`` (:mod:`medisyn.release.card`). Built in a
   local temporary folder and put in place whole (``storage.upload_dir``), then the record
   ``release/<name>.json`` last: the same inputs again do nothing, changed inputs release anew.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.configtools import ConfigError, to_dict
from medisyn.records import (
    atomic_write_table,
    atomic_write_text,
    corpus_identity,
    finished_with,
    read_corpus,
    read_manifest,
    set_identity,
    shard_files,
)
from medisyn.release.card import croissant, readme, sources_used

log = logging.getLogger(__name__)

# Why an image is left out, in the order they are checked (an image gets the first that applies)
REASONS = ("not decodable", "identical to a corpus image", "flagged by distance", "over max_gap", "no guidance_gap",
           "not audited")  # fmt: skip
LEFT_OUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("file", pa.string()),
        ("reason", pa.string()),
        ("distance", pa.float64()),
        ("guidance_gap", pa.float64()),
    ]
)


class ReleaseRefused(ConfigError):
    """The set breaks the release policy; the message names every breach."""


def _features():
    """The rows' Hugging Face features: ``datasets`` writes the schema metadata ``load_dataset`` reads."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "id": Value("string"),
            "prompt": Value("string"),
            "specialty": Value("string"),
            "image_type": Value("string"),
            "labels": List(Value("string")),
            "seed": Value("int64"),
            "model": Value("string"),
            "distance": Value("float64"),
            "relative_distance": Value("float64"),
            "guidance_gap": Value("float64"),
            "fidelity_label": Value("string"),
        }
    )


def digest(path) -> str | None:
    """A record file's content digest (its identity in the release's inputs); None when absent."""
    p = storage.path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def audit_records(run_path, set_name: str, identity: dict) -> dict[str, dict]:
    """Each audit's record for this set: ``{audit: {"record": dict | None, "file", "problem": str | None}}``.
    A problem says why the record cannot stand for these images: missing, or finished on other inputs."""
    files = {"memorization": "audit/memorization/summary.json", "fidelity": "audit/fidelity.json"}
    out = {}
    for audit, rel in files.items():
        f = run_path / rel
        entry = {"record": None, "file": f, "problem": None}
        if not f.is_file():
            entry["problem"] = f"the {audit} audit has not finished (no {rel})"
        else:
            record = json.loads(f.read_text())
            inputs = record.get("inputs", {})
            audited = inputs.get("sets", {})
            if set_name not in audited:
                entry["problem"] = f"the {audit} audit did not audit set {set_name!r} (add it to audit_{audit}.sets)"
            elif audited[set_name] != identity["set"]:
                entry["problem"] = f"the {audit} audit is stale: it saw other images of set {set_name!r}"
            elif inputs.get("corpus") != identity["corpus"]:
                entry["problem"] = f"the {audit} audit is stale: it ran on another corpus"
            elif audit == "memorization" and (
                f"synthetic:{set_name}" not in record.get("by_kind", {}) or not (f.parent / "pairs.parquet").is_file()
            ):
                entry["problem"] = f"the memorization audit has no pairs for set {set_name!r}"
            else:
                entry["record"] = record
        out[audit] = entry
    return out


def policy_breaches(r, audits: dict, set_name: str, gaps: list) -> list[str]:
    """Every way the set breaks ``release`` (a ReleaseConfig); empty when it may be released."""
    out = [f"{audits[a]['problem']} (release.require)" for a in r.require if audits[a]["problem"]]
    mem = audits["memorization"]["record"]
    if mem is not None:
        o = mem["by_kind"][f"synthetic:{set_name}"]["overall"]
        rate = o["flagged"] / o["pairs"] if o["pairs"] else 0.0
        if rate > r.max_flag_rate:
            out.append(
                f"memorization flag rate {rate:.2%} ({o['flagged']} of {o['pairs']}) is above "
                f"release.max_flag_rate {r.max_flag_rate:.2%}"
            )
        if r.on_flagged == "refuse" and o["flagged"]:
            out.append(f"{o['flagged']} image(s) flagged by the memorization audit and release.on_flagged is refuse")
    if r.min_fidelity > 0:
        fid = audits["fidelity"]
        if fid["record"] is None:
            out.append(f"release.min_fidelity is set but {fid['problem']}")
        else:
            shares = fid["record"]["sets"][set_name]["specialty"]["by_label"]
            for sp, v in sorted(shares.items()):
                if v["share"] < r.min_fidelity:
                    out.append(
                        f"prompt fidelity of {sp} is {v['share']:.0%} of {v['n']} images, below "
                        f"release.min_fidelity {r.min_fidelity:.0%}"
                    )
    if r.max_gap > 0 and gaps and all(g is None for g in gaps):
        out.append(
            "release.max_gap is set but the set's manifest records no guidance_gap (made before it was recorded, "
            "or without guidance): set release.max_gap=0 or generate the set again"
        )
    return out


def hash_shard(shard: str, wanted: list[str]) -> tuple[int, list[str]]:
    """Ray task: sha256 every image of one corpus shard (row group by row group); returns how many it
    hashed and which of ``wanted`` it holds. No hash and no image leaves the task otherwise."""
    want, found, n = set(wanted), set(), 0
    pf = storage.parquet_file(shard)
    for batch in pf.iter_batches(columns=["image"], batch_size=256):
        for data in batch.column(0).to_pylist():
            n += 1
            h = hashlib.sha256(data).hexdigest()
            if h in want:
                found.add(h)
    return n, sorted(found)


def corpus_copies(corpus, byte_hashes: set[str], pixel_ids: set[str]) -> tuple[set[str], set[str], int]:
    """Which of the set's byte hashes and pixel ids belong to a corpus image, and how many corpus images
    were hashed. Bytes: one Ray task per shard (:func:`hash_shard`). Pixels: the corpus id is the
    sha256 of its pixels (ingest), so a filtered read of the index finds them without decoding."""
    import ray

    from medisyn.raytools import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(hash_shard)
    wanted = ray.put(sorted(byte_hashes))
    refs = [task.remote(storage.uri(s), wanted) for s in shard_files(corpus)]
    count, bytes_found = 0, set()
    for n, found in ray.get(refs):
        count += n
        bytes_found |= set(found)
    by_pixels = read_corpus(corpus, ["id"], where=pc.field("id").isin(sorted(pixel_ids))) if pixel_ids else None
    pixels_found = set(by_pixels.column("id").to_pylist()) if by_pixels is not None else set()
    return bytes_found, pixels_found, count


def inspect_image(data: bytes) -> tuple[bool, list[str]]:
    """(decodes, pixel ids): the ids ingest would give these pixels (sha256 of the array and its shape),
    as stored and, for a grey image saved as RGB, as one channel."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        arr = np.asarray(im)
    except Exception:  # noqa: BLE001 - any decoder failure means the file cannot be shared
        return False, []
    ids = [hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:32]]
    grey_rgb = arr.ndim == 3 and arr.shape[2] >= 3
    if grey_rgb and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        grey = np.ascontiguousarray(arr[..., 0])
        ids.append(hashlib.sha256(grey.tobytes() + str(grey.shape).encode()).hexdigest()[:32])
    return True, ids


def model_of(run_path, checkpoints: set[str]) -> str:
    """The model's identity for the rows: the checkpoint the images were made with, and the exported
    U-Net weights' digest when ``model/`` holds that checkpoint (select's export)."""
    names = ", ".join(sorted(c for c in checkpoints if c)) or "unknown"
    record = run_path / "model" / "medisyn.json"
    if record.is_file() and json.loads(record.read_text()).get("checkpoint") in checkpoints:
        from medisyn.models import dir_content

        weights = dir_content(run_path / "model" / "unet", ("*.safetensors",))
        if weights:
            h = hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16]
            return f"{names} (unet sha256 {h})"
    return f"{names} (weights digest unknown: no exported model of it in the run)"


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"n": 0}
    return {"n": len(v), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


def figures(cfg: RunConfig, set_name: str, audits: dict, kept: list[dict], left: list[dict], hashed: int) -> dict:
    """Every number the card prints (the report reads them from the record)."""
    r = cfg.release
    out: dict = {
        "rows": len(kept),
        "left_out": dict(Counter(x["reason"] for x in left)),
        "corpus_images_hashed": hashed,
        "by_specialty": dict(Counter(x["specialty"] for x in kept)),
        "sampling": {  # as the manifest records it, per image (one value each in a set made in one run)
            k: sorted({x[k] for x in kept}, key=str) for k in ("scheduler", "steps", "guidance_scale")
        },
        "guidance_gap": {
            sp: _stats([x["guidance_gap"] for x in kept if x["specialty"] == sp])
            for sp in sorted({x["specialty"] for x in kept})
        },
    }
    mem = audits["memorization"]["record"]
    if mem is not None:
        kinds = mem["by_kind"]
        keep = ("pairs", "mean", "sd", "flagged", "flagged_pct", "flagged_rate_upper95", "min", "p1")
        mine = kinds[f"synthetic:{set_name}"]
        out["memorization"] = {
            "threshold": mem["threshold"],
            "overall": {k: mine["overall"][k] for k in keep},
            "by_specialty": {sp: {k: v[k] for k in keep} for sp, v in mine["by_specialty"].items()},
            "p_closer_than_test_control": mine.get("p_closer_than_test_control"),
            "controls": {k: {f: v["overall"][f] for f in keep} for k, v in kinds.items() if k.startswith("control:")},
        }
    fid = audits["fidelity"]["record"]
    if fid is not None:
        s, real = fid["sets"][set_name], fid["real_test"]
        ceiling = real["specialty"]["by_label"]
        out["fidelity"] = {
            "features": fid.get("features"),
            "specialty": s["specialty"]["share"],
            "class": s["class"]["share"],
            "by_specialty": {
                sp: {"n": v["n"], "share": v["share"], "real_test": ceiling.get(sp, {}).get("share")}
                for sp, v in s["specialty"]["by_label"].items()
            },
            "real_test": {"specialty": real["specialty"]["share"], "class": real["class"]["share"]},
        }
    utility = cfg.run_path / "audit" / "utility" / "summary.json"
    if utility.is_file():
        u = json.loads(utility.read_text())
        sets = u.get("inputs", {}).get("sets", {})
        out["utility"] = {
            "sets": sorted(sets),
            "same_images": sets.get(set_name) == audits["identity"]["set"],
            "tasks": {
                name: [
                    {"a": c["a"], "b": c["b"], "difference": c["paper_style"], "over_seeds": c.get("two_level")}
                    for c in t.get("comparisons", [])
                ]
                for name, t in u.get("tasks", {}).items()
            },
        }
    out["policy"] = {k: v for k, v in to_dict(r).items() if k not in ("intended_use",)}
    return out


def run(cfg: RunConfig) -> dict:
    r = cfg.release
    if not r.set:
        print("release: release.set is empty: nothing to release (name a synthetic set, e.g. release.set=memorization)")
        return {}
    name = r.name or r.set
    set_dir = cfg.run_path / "synthetic" / r.set
    corpus = cfg.run_path / "corpus"
    root = cfg.run_path / "release"
    manifest = read_manifest(set_dir).to_pylist()
    for row in manifest:  # manifests written before the column read as null
        row.setdefault("guidance_gap", None)
    identity = {"set": set_identity(set_dir), "corpus": corpus_identity(corpus)}
    audits = audit_records(cfg.run_path, r.set, identity)
    breaches = policy_breaches(r, audits, r.set, [row["guidance_gap"] for row in manifest])
    if breaches:
        raise ReleaseRefused(f"release of set {r.set!r} refused:\n  - " + "\n  - ".join(breaches))
    for a in ("memorization", "fidelity"):
        if a not in r.require and audits[a]["problem"] and "has not finished" not in audits[a]["problem"]:
            print(f"release: note: {audits[a]['problem']}; its figures are not used")
    audits["identity"] = identity
    model = model_of(cfg.run_path, {row["checkpoint"] for row in manifest})
    inputs = {
        "set": r.set,
        "set_identity": identity["set"],
        "corpus": identity["corpus"],
        "audits": {a: digest(audits[a]["file"]) for a in ("memorization", "fidelity") if audits[a]["record"]},
        "utility": digest(cfg.run_path / "audit" / "utility" / "summary.json"),
        "model": model,
        "settings": to_dict(r),
    }
    record_file = root / f"{name}.json"
    done = finished_with(record_file, inputs)
    if done is not None and (root / name / "README.md").is_file():
        print(f"release: {name} already released from these images, corpus, audits and settings ({root / name})")
        return done

    pairs = {}
    if audits["memorization"]["record"] is not None:
        table = storage.read_table(audits["memorization"]["file"].parent / "pairs.parquet")
        kind = f"synthetic:{r.set}"
        pairs = {p["id"]: p for p in table.to_pylist() if p["kind"] == kind}
    looks, byte_hash = {}, {}
    for row in manifest:  # pass 1: decode and hash each image (only hashes are kept)
        f = set_dir / row["file"]
        data = f.read_bytes() if f.is_file() else b""
        looks[row["id"]] = inspect_image(data) if data else (False, [])
        byte_hash[row["id"]] = hashlib.sha256(data).hexdigest()
    copies_bytes, copies_pixels, hashed = corpus_copies(
        corpus, set(byte_hash.values()), {i for ok, ids in looks.values() for i in ids}
    )

    def reason(row) -> str | None:
        ok, pixel_ids = looks[row["id"]]
        pair, gap = pairs.get(row["id"]), row["guidance_gap"]
        checks = (
            not ok,
            byte_hash[row["id"]] in copies_bytes or bool(copies_pixels & set(pixel_ids)),
            pair is not None and bool(pair["flagged"]),
            r.max_gap > 0 and gap is not None and gap > r.max_gap,
            r.max_gap > 0 and gap is None,
            bool(pairs) and pair is None,
        )
        return next((why for why, hit in zip(REASONS, checks, strict=True) if hit), None)

    kept, left = [], []
    for row in manifest:
        why, pair = reason(row), pairs.get(row["id"], {})
        entry = {**row, "distance": pair.get("distance"), "relative_distance": pair.get("relative_distance")}
        (left if why else kept).append({**entry, "reason": why})
    numbers = figures(cfg, r.set, audits, kept, left, hashed)
    sources = sources_used(cfg, corpus)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        files = write_shards(folder / "data", kept, set_dir, model, r.shard_rows)
        (folder / "README.md").write_text(readme(cfg, name, numbers, sources, model, files))
        card = croissant(cfg, name, numbers, sources, model, files)
        (folder / "croissant.json").write_text(json.dumps(card, indent=2))
        storage.upload_dir(folder, root / name, last="README.md")
    atomic_write_table(
        pa.Table.from_pylist([{k: x[k] for k in LEFT_OUT_SCHEMA.names} for x in left], LEFT_OUT_SCHEMA),
        root / f"{name}.left_out.parquet",
    )
    record = {
        "name": name,
        "set": r.set,
        "rows": len(kept),
        "left_out": numbers["left_out"],
        "figures": numbers,
        "files": ["README.md", "croissant.json", *files],
        "left_out_file": f"{name}.left_out.parquet",
        "inputs": inputs,
    }
    atomic_write_text(json.dumps(record, indent=2), record_file)  # last: the stage's record
    print(
        f"release: {name}: {len(kept)} images in {len(files)} shard(s); left out {len(left)}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(numbers['left_out'].items()))})" if left else "")
        + f"; {hashed} corpus images hashed, none in the release"
    )
    print(f"release: {root / name}  (list of left-out images: {root / f'{name}.left_out.parquet'})")
    return record


def write_shards(folder: Path, kept: list[dict], set_dir, model: str, shard_rows: int) -> list[str]:
    """The kept images as ``train-0000i-of-0000N.parquet`` (the Hugging Face layout), read again from the
    set one shard at a time; returns their paths relative to the release folder."""
    features = _features()
    schema = features.arrow_schema
    n = max(1, -(-len(kept) // shard_rows))
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        chunk = kept[i * shard_rows : (i + 1) * shard_rows]
        rows = [
            {
                "image": {"bytes": (set_dir / x["file"]).read_bytes(), "path": x["file"]},
                "id": x["id"],
                "prompt": x["prompt"],
                "specialty": x["specialty"],
                "image_type": x["image_type"],
                "labels": list(x["labels"] or []),
                "seed": x["seed"],
                "model": model,
                "distance": x["distance"],
                "relative_distance": x["relative_distance"],
                "guidance_gap": x["guidance_gap"],
                "fidelity_label": None,  # the fidelity audit records shares, not a label per image
            }
            for x in chunk
        ]
        name = f"train-{i:05d}-of-{n:05d}.parquet"
        storage.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)
        names.append(f"data/{name}")
    return names

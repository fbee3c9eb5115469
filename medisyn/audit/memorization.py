"""The ``audit-memorization`` stage: is any synthetic image a copy of a training image?

1. Embeddings (``medisyn.audit.embeddings``): the embedder (BiomedCLIP's vision tower through
   open_clip on real runs; the ``tiny-embedder`` offline) of every real train image, the test
   control and every synthetic image of the audited sets, by a Ray Data actor pool (a GPU each
   where there are GPUs), unit length, written batch by batch as parquet parts under
   ``audit/memorization/embeddings/<name>/<group>/``, one subfolder per (specialty, image type)
   (a re-run embeds only ids no part holds).
2. Exact top-k (k = 50) inner-product search per (specialty, image type), one Ray task per
   chunk of queries, the train side streamed part by part from its group's subfolder only
   (:func:`medisyn.audit.neighbours.topk_search`): no step holds a whole group's embeddings,
   and no task reads another group's.
3. Patch distance (:func:`medisyn.audit.neighbours.patch_distance`, 4×4 grid) to all k
   neighbours, one Ray task per corpus shard that holds candidates (only the row groups that
   hold them read, only the candidate rows decoded), so the corpus is never read per query;
   the match is the neighbour with the smallest distance (re-ranked; how often that is not
   the embedding's top-1 is reported). The relative distance (distance / (α · mean distance
   to the k neighbours)) is reported beside it. A pair at or below the threshold (0.15) is
   flagged.
4. Controls: held-out real test images against train, and train images against train with
   each left out of its own search; a one-sided test that synthetic images are not closer.
5. Outputs in ``audit/memorization/``: ``pairs.parquet`` (every query's match, with a synthetic
   image's guidance gap; ``summary.json``'s ``guidance_gap``: its n, median, p90 and max per set
   and specialty, drawn in ``guidance_gap.png``), ``summary.json``
   (Table 1 per specialty and overall with tail statistics; flag rates by how many copies of the
   matched train image ingest dropped as duplicates), ``histograms.png`` and
   ``gallery.png`` (every flagged pair, then the closest unflagged ones).
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
from tqdm import tqdm
from upath import UPath

from medisyn import storage
from medisyn.audit.embeddings import (
    corpus_source,
    embed,
    embedding_shards,
    embeddings_dir,
    files_source,
    group_name,
    read_embeddings,
)
from medisyn.audit.neighbours import patch_distance, topk_search
from medisyn.audit.stats import closer_than_control, tail_summary
from medisyn.config import RunConfig
from medisyn.configtools import to_dict
from medisyn.figures import save_png
from medisyn.records import (
    CAPTION_SHARE_BINS,
    atomic_write_bytes,
    atomic_write_table,
    atomic_write_text,
    caption_share_bin,
    corpus_identity,
    corpus_index,
    decode_rgb,
    finished_with,
    read_corpus,
    read_manifest,
    read_rows,
    read_shards,
    set_identity,
    shard_files,
)
from medisyn.storage import path as store_path
from medisyn.storage import uri

log = logging.getLogger(__name__)

SERIES_TYPES = ("computed tomography", "magnetic resonance imaging")  # image types whose images are slices


def search_group(
    real_dir: str,
    group: str,
    train_ids: list[str],
    query_dir: str,
    query_ids: list[str],
    k: int,
    leave_one_out: bool,
    shard: int,
) -> list[list[str]]:
    """Ray task: each query's top-k train ids by embedding within one group, the train side
    streamed part by part (and ``shard`` rows at a time) from that group's subfolder of the
    embeddings store; queries and keys are read from ``group``'s parts only."""
    wanted = read_embeddings(store_path(query_dir), query_ids, group)
    q = np.stack([wanted[i] for i in query_ids])
    seen: list[str] = []

    def key_shards():
        for ids, keys in embedding_shards(store_path(real_dir), train_ids, group):
            for start in range(0, len(ids), shard):
                offset = len(seen)
                seen.extend(ids[start : start + shard])
                yield offset, keys[start : start + shard]

    scores, idx = topk_search(q, key_shards(), k + int(leave_one_out))  # one more: the query itself, dropped
    out = []
    for query_id, srow, irow in zip(query_ids, scores, idx, strict=True):
        found = [seen[j] for s, j in zip(srow, irow, strict=True) if np.isfinite(s)]
        out.append([c for c in found if not (leave_one_out and c == query_id)][:k])
    return out


def shard_distances(shard: str, work: list[tuple[int, str, int, str]], grid: int) -> list[tuple[int, float]]:
    """Ray task: the patch distances of every pair whose train image lives in one corpus shard.

    ``work`` rows are (pair index, train id, row in the shard, query image file); the shard is
    read once, each query image decoded once, each train image once per query size."""
    images = read_rows(shard, sorted({row for _, _, row, _ in work}))

    @functools.lru_cache(maxsize=64)
    def query(path: str) -> np.ndarray:
        return decode_rgb(store_path(path).read_bytes())

    @functools.lru_cache(maxsize=256)
    def train(image_id: str, size: tuple[int, int]) -> np.ndarray:
        return decode_rgb(images[image_id], size)

    out = []
    for pair, image_id, _, path in sorted(work, key=lambda w: w[3]):  # by query: its pixels stay cached
        q = query(path)
        out.append((pair, patch_distance(q, train(image_id, (q.shape[1], q.shape[0])), grid)))
    return out


def stage_query_images(index: dict, ids: list[str], folder: UPath) -> dict[str, str]:
    """Copy corpus images that serve as queries (the controls) to files, one read per shard."""
    import ray

    def copy(shard: str, wanted: list[tuple[str, int]], folder: str) -> None:
        for image_id, data in read_rows(shard, [row for _, row in wanted]).items():
            atomic_write_bytes(data, store_path(folder) / f"{image_id}.img")

    folder.mkdir(parents=True, exist_ok=True)
    todo = defaultdict(list)
    for image_id in ids:
        if not (folder / f"{image_id}.img").exists():
            shard, row = index[image_id]
            todo[shard].append((image_id, row))
    ray.get([ray.remote(num_cpus=1)(copy).remote(shard, wanted, uri(folder)) for shard, wanted in todo.items()])
    return {i: uri(folder / f"{i}.img") for i in ids}


def find_matches(cfg: RunConfig, jobs: list[dict], index: dict, chunk: int = 1024) -> list[dict]:
    """Each query's match among its group's train images: top-k by embedding, re-ranked by pixels.

    A job is ``{"kind", "queries": [{id, specialty, image_type}] (of one group), "train_ids",
    "query_dir", "paths": {query id: image file}, "leave_one_out"}``. Searches run as one Ray task
    per (job, chunk of queries), each reading its group's embeddings only; then every candidate
    pair is grouped by the corpus shard that holds its train image, and one Ray task per shard
    computes those patch distances, so the corpus is read once, only where candidates live, and
    no image passes through the driver."""
    import ray

    m = cfg.audit_memorization
    real_dir = uri(embeddings_dir(cfg, "real"))
    search = ray.remote(num_cpus=1)(search_group)
    futures, shared = [], {}  # a group's train ids go to the object store once, whichever kinds query it
    for job in jobs:
        if not job["queries"] or not job["train_ids"]:
            continue
        if id(job["train_ids"]) not in shared:
            shared[id(job["train_ids"])] = ray.put(job["train_ids"])
        ids_ref = shared[id(job["train_ids"])]
        for start in range(0, len(job["queries"]), chunk):
            rows = job["queries"][start : start + chunk]
            ref = search.remote(
                real_dir,
                group_name(rows[0]["specialty"], rows[0]["image_type"]),
                ids_ref,
                uri(job["query_dir"]),
                [r["id"] for r in rows],
                m.k,
                job["leave_one_out"],
                m.shard_size,
            )
            futures.append((job, rows, ref))
    queries, work, n_pairs = [], defaultdict(list), 0
    for job, rows, ref in tqdm(futures, desc="memorization search", unit="chunk", mininterval=10):
        for r, candidates in zip(rows, ray.get(ref), strict=True):
            queries.append({**r, "kind": job["kind"], "candidates": candidates, "first": n_pairs})
            for rank, c in enumerate(candidates):
                shard, row = index[c]
                work[shard].append((n_pairs + rank, c, row, job["paths"][r["id"]]))
            n_pairs += len(candidates)
    distance = np.full(n_pairs, np.nan)
    remote = ray.remote(num_cpus=1)(shard_distances)
    pending = [remote.remote(shard, w, m.grid) for shard, w in work.items()]
    for ref in tqdm(pending, desc="patch distances", unit="shard", mininterval=10):
        for pair, d in ray.get(ref):
            distance[pair] = d
    out = []
    for q in queries:
        if not q["candidates"]:
            continue
        d = distance[q["first"] : q["first"] + len(q["candidates"])]
        best = int(d.argmin())
        out.append(
            {
                **{k: v for k, v in q.items() if k not in ("candidates", "first")},
                "match_id": q["candidates"][best],
                "distance": float(d[best]),
                "relative_distance": float(d[best] / (m.relative_alpha * d.mean())) if d.mean() > 0 else float("nan"),
                "embedding_rank": best,  # 0 = the embedding's top-1 was also the closest in pixels
            }
        )
    return out


def near_duplicate_counts(run_path: UPath) -> dict[str, int]:
    """``{source_ref: n}``: how many copies ingest dropped as duplicates of each kept image."""
    counts: Counter = Counter()
    try:
        rejects = read_shards(run_path / "rejects", ["stage", "reason"])
    except FileNotFoundError:
        return {}
    for stage, reason in zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist(), strict=True):
        if stage == "dedup" and " duplicate of " in reason:
            counts[reason.split(" duplicate of ", 1)[1]] += 1
    return dict(counts)


def run(cfg: RunConfig) -> dict:
    from medisyn.raytools import ensure_ray

    m = cfg.audit_memorization
    corpus = cfg.run_path / "corpus"
    out = cfg.run_path / "audit" / "memorization"
    inputs = {  # every set present before any work
        "sets": {name: set_identity(cfg.run_path / "synthetic" / name) for name in m.sets},
        "corpus": corpus_identity(corpus),
        # how it is spread over the cluster does not change a distance
        "settings": {
            k: v for k, v in to_dict(m).items() if k not in ("shard_size", "batch_size", "min_actors", "max_actors")
        },
        "seed": cfg.seed,
    }
    done = finished_with(out / "summary.json", inputs)
    if done is not None:
        print(f"audit-memorization: already done for these sets, corpus and settings ({out})")
        return done
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in m.sets:  # every set present before any work
        folder = cfg.run_path / "synthetic" / name
        rows = read_manifest(folder, ["id", "file", "prompt", "specialty", "image_type", "guidance_gap"]).to_pylist()
        per_prompt: Counter = Counter()
        kept = []
        for r in rows:
            per_prompt[r["prompt"]] += 1
            if per_prompt[r["prompt"]] <= m.images_per_prompt:
                kept.append({**r, "path": uri(folder / r["file"])})
        sets[name] = kept
    columns = ["id", "specialty", "image_type", "split", "source_ref", "caption"]
    has_series = (
        "series" in storage.parquet_file(shard_files(corpus)[0]).schema_arrow.names if shard_files(corpus) else False
    )
    real = read_corpus(corpus, columns=columns + (["series"] if has_series else [])).to_pandas()
    train, test = real[real["split"] == "train"], real[real["split"] == "test"]
    rng = np.random.default_rng(cfg.seed)
    cols = ["id", "specialty", "image_type"]
    loo = train.iloc[sorted(rng.choice(len(train), min(m.control_queries, len(train)), replace=False))]
    ctl_test = test.iloc[sorted(rng.choice(len(test), min(m.control_queries, len(test)), replace=False))]
    loo, ctl_test = loo[cols].to_dict("records"), ctl_test[cols].to_dict("records")
    ensure_ray()
    group_of = dict(zip(real["id"], zip(real["specialty"], real["image_type"], strict=True), strict=True))
    real_ids = set(train["id"]) | set(test["id"])
    real_dir = embed(cfg, "real", {i: group_of[i] for i in real_ids}, corpus_source(corpus))
    index = corpus_index(corpus)
    control_paths = stage_query_images(index, [r["id"] for r in ctl_test + loo], out / "queries")
    kinds = [
        (f"synthetic:{n}", rows, False, embed(cfg, f"synthetic-{n}", {r["id"]: (r["specialty"], r["image_type"])
            for r in rows}, files_source(cfg.run_path / "synthetic" / n)), {r["id"]: r["path"] for r in rows})
        for n, rows in sets.items()
    ]  # fmt: skip
    kinds += [("control:test", ctl_test, False, real_dir, control_paths)]
    kinds += [("control:train-loo", loo, True, real_dir, control_paths)]
    train_by_group = {g: list(ids) for g, ids in train.groupby(["specialty", "image_type"])["id"]}
    jobs = []
    for kind, rows, loo_flag, query_dir, paths in kinds:
        by_group: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            by_group[(r["specialty"], r["image_type"])].append({k: r[k] for k in cols})
        for group, queries in sorted(by_group.items()):
            if group not in train_by_group:
                log.warning("audit-memorization: no train images of %s / %s to compare %d %s images with",
                            *group, len(queries), kind)  # fmt: skip
            jobs.append({"kind": kind, "queries": queries, "train_ids": train_by_group.get(group, []),
                         "query_dir": query_dir, "paths": paths, "leave_one_out": loo_flag})  # fmt: skip
    dups, ref_of = near_duplicate_counts(cfg.run_path), dict(zip(real["id"], real["source_ref"], strict=True))
    series_of = dict(zip(real["id"], real["series"], strict=True)) if has_series else {}
    gap_of = {(f"synthetic:{n}", r["id"]): r["guidance_gap"] for n, rows in sets.items() for r in rows}
    pairs = [
        {
            **r,
            "flagged": r["distance"] <= m.threshold,
            # the second signal (generate's guidance gap) of a synthetic image; null for controls and unguided sets
            "guidance_gap": gap_of.get((r["kind"], r["id"])),
            "match_near_duplicates": dups.get(ref_of[r["match_id"]], 0),
            # slices of one CT/MR series are near copies of each other: flags are also counted per series
            "match_series": series_of.get(r["match_id"]) if r["image_type"] in SERIES_TYPES else None,
        }
        for r in find_matches(cfg, jobs, index)
    ]
    table = pa.Table.from_pylist(pairs)
    if "guidance_gap" in table.column_names:  # float64 even where every gap is null (a set made before the gap)
        table = table.set_column(
            table.column_names.index("guidance_gap"), "guidance_gap", table.column("guidance_gap").cast(pa.float64())
        )
    atomic_write_table(table, out / "pairs.parquet")
    summary = summarize(pairs, m.threshold) | {"inputs": inputs}
    summary["by_caption_share"] = by_caption_share(pairs, dict(zip(train["id"], train["caption"], strict=True)))
    summary["guidance_gap"] = gap_summary(sets)
    gap_figure(sets, out / "guidance_gap.png")
    histograms(pairs, m.threshold, out / "histograms.png")
    gallery(cfg, pairs, sets, out / "gallery.png", index)
    atomic_write_text(json.dumps(summary, indent=2), out / "summary.json")  # last: the stage's record
    for kind, s in summary["by_kind"].items():
        o = s["overall"]
        print(
            f"audit-memorization: {kind}: {o['pairs']} pairs, distance {o['mean']:.3f} ± {o['sd']:.3f}, "
            f"{o['flagged']} at or below {m.threshold} (95% upper bound {o['flagged_rate_upper95']:.2%}), "
            f"min {o['min']:.3f}"
        )
    print(f"audit-memorization: {out}")
    return summary


def summarize(pairs: list[dict], threshold: float) -> dict:
    """Table 1 per specialty and overall, for each kind (synthetic sets and the two controls)."""
    by_kind: dict[str, dict] = {}
    for kind in sorted({p["kind"] for p in pairs}):
        rows = [p for p in pairs if p["kind"] == kind]
        d = np.array([p["distance"] for p in rows])
        entry = {"overall": tail_summary(d, threshold), "by_specialty": {}}
        for sp in sorted({p["specialty"] for p in rows}):
            entry["by_specialty"][sp] = tail_summary(
                np.array([p["distance"] for p in rows if p["specialty"] == sp]), threshold
            )
        matched = Counter(p["match_id"] for p in rows)
        entry["distinct_train_images_matched"] = len(matched)
        entry["most_matches_to_one_train_image"] = max(matched.values()) if matched else 0
        entry["match_not_embedding_top1"] = sum(p["embedding_rank"] > 0 for p in rows)
        entry["relative_distance_mean"] = float(np.nanmean([p["relative_distance"] for p in rows])) if rows else None
        entry["by_match_near_duplicates"] = {}  # copies ingest dropped of the matched train image: 0, 1, 2+
        for bucket, test in (("0", lambda n: n == 0), ("1", lambda n: n == 1), ("2+", lambda n: n >= 2)):
            sel = [p for p in rows if test(p.get("match_near_duplicates", 0))]
            if sel:
                flagged = sum(p["flagged"] for p in sel)
                entry["by_match_near_duplicates"][bucket] = {
                    "pairs": len(sel),
                    "flagged": flagged,
                    "flagged_pct": 100.0 * flagged / len(sel),
                }
        sliced = [p for p in rows if p.get("match_series")]
        if sliced:  # CT/MR: how the flags spread over the matched train images' series
            per_series = Counter(p["match_series"] for p in sliced if p["flagged"])
            entry["by_series"] = {
                "pairs": len(sliced),
                "series_matched": len({p["match_series"] for p in sliced}),
                "flagged": sum(p["flagged"] for p in sliced),
                "series_with_flagged": len(per_series),
                "most_flagged_in_one_series": max(per_series.values(), default=0),
            }
        by_kind[kind] = entry
    control = np.array([p["distance"] for p in pairs if p["kind"] == "control:test"])
    for kind, entry in by_kind.items():
        if kind.startswith("synthetic"):
            d = np.array([p["distance"] for p in pairs if p["kind"] == kind])
            entry["p_closer_than_test_control"] = closer_than_control(d, control)
    return {"threshold": threshold, "by_kind": by_kind}


def gap_summary(sets: dict[str, list[dict]]) -> dict:
    """The guidance gap's spread per audited set and specialty: ``{set: {specialty | "overall": {n, median,
    p90, max}}}`` over the audited images that recorded one (a set made before the gap, or unguided, has n 0)."""

    def stats(values: list[float]) -> dict:
        v = np.asarray(values, dtype=float)
        if not len(v):
            return {"n": 0, "median": None, "p90": None, "max": None}
        return {"n": len(v), "median": float(np.median(v)), "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}

    out = {}
    for name, rows in sets.items():
        known = [r for r in rows if r.get("guidance_gap") is not None and np.isfinite(r["guidance_gap"])]
        entry = {"overall": stats([r["guidance_gap"] for r in known])}
        for sp in sorted({r["specialty"] for r in rows}):
            entry[sp] = stats([r["guidance_gap"] for r in known if r["specialty"] == sp])
        out[name] = entry
    return out


def gap_figure(sets: dict[str, list[dict]], path: UPath) -> None:
    """A strip of each set's guidance gaps per specialty (the report's guidance_gap.png); none when no image
    recorded a gap."""
    points = [(name, r["specialty"], r["guidance_gap"]) for name, rows in sets.items() for r in rows
              if r.get("guidance_gap") is not None and np.isfinite(r["guidance_gap"])]  # fmt: skip
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specialties = sorted({sp for _, sp, _ in points})
    names = sorted({n for n, _, _ in points})
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(specialties), 3.0))
    for k, name in enumerate(names):
        for x, sp in enumerate(specialties):
            v = [g for n, s, g in points if n == name and s == sp]
            offset = (k - (len(names) - 1) / 2) * 0.8 / max(1, len(names))
            ax.scatter(x + offset + rng.uniform(-0.08, 0.08, len(v)), v, s=6, alpha=0.6,
                       label=name if x == 0 else None, color=f"C{k}")  # fmt: skip
    ax.set_xticks(range(len(specialties)), specialties, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("guidance gap (first steps)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


def histograms(pairs: list[dict], threshold: float, path: UPath) -> None:
    """Distance histograms per specialty: synthetic sets against the two controls, the threshold drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specialties = sorted({p["specialty"] for p in pairs}) or ["-"]
    fig, axes = plt.subplots(1, len(specialties), figsize=(3.2 * len(specialties), 2.8), squeeze=False)
    for ax, sp in zip(axes[0], specialties, strict=True):
        for kind in sorted({p["kind"] for p in pairs}):
            d = [p["distance"] for p in pairs if p["kind"] == kind and p["specialty"] == sp]
            if d:
                ax.hist(d, bins=20, range=(0, 1), alpha=0.5, label=kind, density=True)
        ax.axvline(threshold, color="red", linestyle="--", linewidth=1)
        ax.set_title(sp, fontsize=9)
        ax.set_xlabel("patch distance", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


def gallery(cfg: RunConfig, pairs: list[dict], sets: dict, path: UPath, index: dict, closest: int = 8) -> None:
    """Every flagged synthetic pair, then the closest unflagged ones: synthetic | train match."""
    from PIL import Image, ImageDraw

    synthetic = sorted((p for p in pairs if p["kind"].startswith("synthetic")), key=lambda p: p["distance"])
    shown = [p for p in synthetic if p["flagged"]] + [p for p in synthetic if not p["flagged"]][:closest]
    tile = 128
    sheet = Image.new("RGB", (2 * tile + 180, max(1, len(shown)) * (tile + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    paths = {r["id"]: r["path"] for rows in sets.values() for r in rows}
    real = {}
    for image_id in {p["match_id"] for p in shown}:  # the shown matches only, each from its own shard
        shard, row = index[image_id]
        real |= read_rows(shard, [row])
    for n, p in enumerate(shown):
        y = n * (tile + 4)
        for col, data in enumerate((store_path(paths[p["id"]]).read_bytes(), real[p["match_id"]])):
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)
            sheet.paste(im, (col * tile, y))
        label = f"{'FLAGGED' if p['flagged'] else 'closest'}\nd = {p['distance']:.3f}\n{p['specialty']}"
        draw.text((2 * tile + 8, y + 8), label, fill="red" if p["flagged"] else "black")
    save_png(sheet, path)


def by_caption_share(pairs: list[dict], train_captions: dict[str, str]) -> dict[str, dict[str, dict]]:
    """Flag rates by how many train images carry the matched train image's caption (the ingest summary's
    bins: 1, 2-4, 5-16, 17-64, 65+), per kind: duplicated captions drive copying (Somepalli et al. 2023).
    ``{kind: {bin: {pairs, flagged, flagged_pct}}}``, bins without a pair left out."""
    share = Counter(train_captions.values())
    out: dict[str, dict[str, dict]] = {}
    for kind in sorted({p["kind"] for p in pairs}):
        counts: dict[str, list[int]] = {name: [0, 0] for _, _, name in CAPTION_SHARE_BINS}
        for p in pairs:
            if p["kind"] == kind and p["match_id"] in train_captions:
                n = counts[caption_share_bin(share[train_captions[p["match_id"]]])]
                n[0], n[1] = n[0] + 1, n[1] + bool(p["flagged"])
        out[kind] = {b: {"pairs": n, "flagged": f, "flagged_pct": 100.0 * f / n} for b, (n, f) in counts.items() if n}
    return out

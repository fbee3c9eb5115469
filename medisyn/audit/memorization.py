"""The ``audit-memorization`` stage: is any synthetic image a copy of a training image?

1. Embeddings: the embedder (BiomedCLIP's vision tower through open_clip on real runs; the
   ``tiny-embedder`` offline) of every real train and test image and every synthetic image of
   the audited sets, by a Ray Data actor pool (a GPU each where there are GPUs), unit length,
   stored with the image id in ``audit/memorization/embeddings/`` (a re-run embeds only ids
   not stored yet).
2. Exact top-k (k = 50) inner-product search per (specialty, image type), the train side
   streamed in shards (:func:`medisyn.audit.neighbours.topk_search`).
3. Patch distance (:func:`medisyn.audit.neighbours.patch_distance`, 4×4 grid) to all k
   neighbours, on pixels read only for the candidate pairs; the match is the neighbour with
   the smallest distance (re-ranked; how often that is not the embedding's top-1 is reported).
   The relative distance (distance / (α · mean distance to the k neighbours)) is reported
   beside it. A pair at or below the threshold (0.15) is flagged.
4. Controls: held-out real test images against train, and train images against train with
   each left out of its own search; a one-sided test that synthetic images are not closer.
5. Outputs in ``audit/memorization/``: ``pairs.parquet`` (every query's match), ``summary.json``
   (Table 1 per specialty and overall with tail statistics), ``histograms.png`` and
   ``gallery.png`` (every flagged pair, then the closest unflagged ones).
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medisyn.audit.neighbours import patch_distance, shards, topk_search
from medisyn.audit.stats import closer_than_control, tail_summary
from medisyn.config import RunConfig
from medisyn.records import atomic_write_table, atomic_write_text, read_corpus, read_images, read_manifest

log = logging.getLogger(__name__)

EMBEDDING_SCHEMA = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])


class Embedder:
    """Ray Data callable class: the embedder loads once per actor; each call embeds a batch.

    Batch in: ``id``, ``image`` (encoded bytes). Batch out: ``id``, ``embedding`` (unit length)."""

    def __init__(self, embedder: str):
        import torch

        from medisyn.models import load_embedder

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.preprocess = load_embedder(embedder)
        self.model = model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        torch = self.torch
        x = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch["image"]])
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            e = self.model.encode_image(x.to(self.device), normalize=True)
        return {"id": batch["id"], "embedding": list(e.float().cpu().numpy())}


def _stored(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    t = pq.read_table(path)
    return dict(zip(t.column("id").to_pylist(), np.asarray(t.column("embedding").to_pylist(), np.float32), strict=True))


def embed(cfg: RunConfig, name: str, ids: list[str], source) -> dict[str, np.ndarray]:
    """``{id: embedding}`` for ``ids``, embedding only ids not yet stored in ``embeddings/<name>.parquet``.

    ``source(todo)`` builds the Ray Dataset (``id``, ``image`` bytes) of the ids still to embed,
    so images are read by Ray Data tasks on the cluster, never by the driver."""
    import ray

    from medisyn.raytools import ensure_ray, gpus_available

    path = cfg.run_path / "audit" / "memorization" / "embeddings" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    have = _stored(path)
    todo = sorted(set(ids) - set(have))
    if todo:
        ensure_ray()
        m = cfg.audit_memorization
        use_gpu = gpus_available(cfg.train.use_gpu)
        ds = source(todo).map_batches(
            Embedder,
            fn_constructor_args=(m.embedder,),
            batch_size=m.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=m.num_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            have |= {str(i): np.asarray(e, np.float32) for i, e in zip(batch["id"], batch["embedding"], strict=True)}
        table = pa.table({"id": list(have), "embedding": [e.tolist() for e in have.values()]}, schema=EMBEDDING_SCHEMA)
        atomic_write_table(table, path)
    missing = [i for i in ids if i not in have]
    if missing:
        raise RuntimeError(f"audit-memorization: {len(missing)} images of {name} could not be embedded")
    return {i: have[i] for i in ids}


def corpus_source(corpus: Path):
    """Ray Dataset of corpus images by id (read from the shards by Ray Data)."""

    def build(todo: list[str]):
        import ray
        from ray.data.expressions import col

        from medisyn.records import shard_files

        ds = ray.data.read_parquet([str(f) for f in shard_files(corpus)], columns=["id", "image"])
        return ds.filter(expr=col("id").is_in(todo))

    return build


def files_source(folder: Path):
    """Ray Dataset of a synthetic set's ``<id>.png`` files by id."""

    def build(todo: list[str]):
        import ray

        ds = ray.data.read_binary_files([str(folder / f"{i}.png") for i in todo], include_paths=True)
        return ds.map(lambda r: {"id": Path(r["path"]).stem, "image": r["bytes"]})

    return build


def _pixels(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    if size and im.size != size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(im)


def match(query_px: np.ndarray, candidates: list[str], pixels, grid: int, alpha: float) -> dict:
    """The candidate with the smallest patch distance; ``pixels(id, size)`` gives a real image
    resized to the query's size (decoded once per group and size, however many queries list it)."""
    size = (query_px.shape[1], query_px.shape[0])
    d = np.array([patch_distance(query_px, pixels(c, size), grid) for c in candidates])
    best = int(d.argmin())
    return {
        "match_id": candidates[best],
        "distance": float(d[best]),
        "relative_distance": float(d[best] / (alpha * d.mean())) if d.mean() > 0 else float("nan"),
        "embedding_rank": best,  # 0 = the embedding's top-1 was also the closest in pixels
    }


def audit_group(
    cfg: RunConfig,
    queries: list[dict],
    train_ids: list[str],
    emb: dict[str, np.ndarray],
    query_images: dict[str, bytes],
    leave_one_out: bool = False,
) -> list[dict]:
    """Each query's match among the group's train images: top-k by embedding, re-ranked by pixels."""
    m = cfg.audit_memorization
    if not queries or not train_ids:
        return []
    keys = np.stack([emb[i] for i in train_ids])
    q = np.stack([emb[r["id"]] for r in queries])
    position = {i: n for n, i in enumerate(train_ids)}
    exclude = np.array([position.get(r["id"], -1) for r in queries]) if leave_one_out else None
    scores, idx = topk_search(q, shards(keys, m.shard_size), m.k, exclude=exclude)
    # an excluded key (the query itself) scores -inf; in a group smaller than k it would still be listed
    candidates = [
        [train_ids[j] for s, j in zip(srow, irow, strict=True) if np.isfinite(s)]
        for srow, irow in zip(scores, idx, strict=True)
    ]
    images = read_images(cfg.run_path / "corpus", {c for row in candidates for c in row})  # only the candidates

    @functools.lru_cache(maxsize=1024)  # bounded: ~0.8 GB of 512² candidates, however large the group
    def pixels(image_id: str, size: tuple[int, int]) -> np.ndarray:
        return _pixels(images[image_id], size)

    out = []
    for r, row in zip(queries, candidates, strict=True):
        if row:
            out.append({**r, **match(_pixels(query_images[r["id"]]), row, pixels, m.grid, m.relative_alpha)})
    return out


def run(cfg: RunConfig) -> dict:
    m = cfg.audit_memorization
    corpus = cfg.run_path / "corpus"
    out = cfg.run_path / "audit" / "memorization"
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in m.sets:  # every set present before any work
        folder = cfg.run_path / "synthetic" / name
        rows = read_manifest(folder, ["id", "file", "prompt", "specialty", "image_type"]).to_pylist()
        per_prompt: Counter = Counter()
        kept = []
        for r in rows:
            per_prompt[r["prompt"]] += 1
            if per_prompt[r["prompt"]] <= m.images_per_prompt:
                kept.append({**r, "path": str(folder / r["file"])})
        sets[name] = kept
    real = read_corpus(corpus, columns=["id", "specialty", "image_type", "split"]).to_pylist()
    train = [r for r in real if r["split"] == "train"]
    test = [r for r in real if r["split"] == "test"]
    rng = np.random.default_rng(cfg.seed)
    loo = [train[i] for i in sorted(rng.choice(len(train), min(m.control_queries, len(train)), replace=False))]
    ctl_test = [test[i] for i in sorted(rng.choice(len(test), min(m.control_queries, len(test)), replace=False))]
    emb = embed(cfg, "real", [r["id"] for r in train + ctl_test], corpus_source(corpus))
    for name, rows in sets.items():
        emb |= embed(cfg, f"synthetic-{name}", [r["id"] for r in rows], files_source(cfg.run_path / "synthetic" / name))
    train_by_group: dict[tuple, list[str]] = defaultdict(list)
    for r in train:
        train_by_group[(r["specialty"], r["image_type"])].append(r["id"])
    pairs = []
    kinds = [(f"synthetic:{n}", rows, False) for n, rows in sets.items()]
    kinds += [("control:test", ctl_test, False), ("control:train-loo", loo, True)]
    for kind, rows, loo_flag in kinds:
        by_group: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            by_group[(r["specialty"], r["image_type"])].append(r)
        for group, queries in sorted(by_group.items()):
            if kind.startswith("synthetic"):
                images = {r["id"]: Path(r["path"]).read_bytes() for r in queries}
            else:
                images = read_images(corpus, {r["id"] for r in queries})
            found = audit_group(cfg, queries, train_by_group.get(group, []), emb, images, leave_one_out=loo_flag)
            if not found and queries:
                log.warning("audit-memorization: no train images of %s / %s to compare %d %s images with",
                            *group, len(queries), kind)  # fmt: skip
            pairs += [
                {
                    "kind": kind,
                    "id": r["id"],
                    "specialty": r["specialty"],
                    "image_type": r["image_type"],
                    "match_id": r["match_id"],
                    "distance": r["distance"],
                    "relative_distance": r["relative_distance"],
                    "embedding_rank": r["embedding_rank"],
                    "flagged": r["distance"] <= m.threshold,
                }
                for r in found
            ]
    atomic_write_table(pa.Table.from_pylist(pairs), out / "pairs.parquet")
    summary = summarize(pairs, m.threshold)
    atomic_write_text(json.dumps(summary, indent=2), out / "summary.json")
    histograms(pairs, m.threshold, out / "histograms.png")
    gallery(cfg, pairs, sets, out / "gallery.png")
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
        by_kind[kind] = entry
    control = np.array([p["distance"] for p in pairs if p["kind"] == "control:test"])
    for kind, entry in by_kind.items():
        if kind.startswith("synthetic"):
            d = np.array([p["distance"] for p in pairs if p["kind"] == kind])
            entry["p_closer_than_test_control"] = closer_than_control(d, control)
    return {"threshold": threshold, "by_kind": by_kind}


def histograms(pairs: list[dict], threshold: float, path: Path) -> None:
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gallery(cfg: RunConfig, pairs: list[dict], sets: dict, path: Path, closest: int = 8) -> None:
    """Every flagged synthetic pair, then the closest unflagged ones: synthetic | train match."""
    from PIL import Image, ImageDraw

    synthetic = sorted((p for p in pairs if p["kind"].startswith("synthetic")), key=lambda p: p["distance"])
    shown = [p for p in synthetic if p["flagged"]] + [p for p in synthetic if not p["flagged"]][:closest]
    tile = 128
    sheet = Image.new("RGB", (2 * tile + 180, max(1, len(shown)) * (tile + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    paths = {r["id"]: r["path"] for rows in sets.values() for r in rows}
    real = read_images(cfg.run_path / "corpus", {p["match_id"] for p in shown}) if shown else {}
    for n, p in enumerate(shown):
        y = n * (tile + 4)
        for col, data in enumerate((Path(paths[p["id"]]).read_bytes(), real[p["match_id"]])):
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)
            sheet.paste(im, (col * tile, y))
        label = f"{'FLAGGED' if p['flagged'] else 'closest'}\nd = {p['distance']:.3f}\n{p['specialty']}"
        draw.text((2 * tile + 8, y + 8), label, fill="red" if p["flagged"] else "black")
    sheet.save(path)

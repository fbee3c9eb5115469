"""The ``cache`` stage: what the frozen encoders say, computed once, so training runs the U-Net only.

- Latents: for every train image, the VAE posterior's mean and log-variance (fp16), not a
  sample — training draws a fresh latent from them at every step. Ray Data streams the
  corpus through CPU tasks that decode the images, then an actor pool (one GPU per actor on GPU
  clusters, as many as the cluster has or can add) that encodes them, and writes parquet.
- Text: for every *unique* caption (a million images share a few hundred templated
  captions) and for "", both text encoders' hidden states (concatenated, as SDXL's U-Net
  reads them) and the pooled embedding of the second encoder. One Ray task loads the two
  text encoders and tokenizers only (no U-Net, no VAE) on a worker, never on the driver.

Keyed by model identity (a VAE directory by its content, not its path) and training resolution
(``cache/<identity>/``); latents are keyed by image id inside it, so a re-run encodes only images
not yet cached (the train split minus the cached ids, a broadcast anti-join: never a literal list
of a million ids in the plan), and a changed model or resolution writes a new cache beside the
old one. ``cache.json`` records the train ids' count and digest; the ids themselves are
``train_ids.parquet`` beside it. Every file goes through :mod:`medisyn.storage`, so the run
directory may be an object-store URI.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
from upath import UPath

from medisyn import storage
from medisyn.config import ModelConfig, RunConfig
from medisyn.configtools import to_dict
from medisyn.images import load_pixels
from medisyn.models import model_identity
from medisyn.records import atomic_write_table, atomic_write_text, read_corpus, shard_files

log = logging.getLogger(__name__)


def cache_dir(cfg: RunConfig) -> UPath:
    return storage.path(cfg.run_dir) / "cache" / model_identity(cfg.model, cfg.train.resolution)


TRAIN_IDS = "train_ids.parquet"  # beside cache.json: the train ids the cache was made for


def ids_digest(ids) -> str:
    """The digest of a set of image ids (order-free), as cache.json and the train stage record it."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def read_train_ids(cache: str | UPath) -> list[str]:
    """The train ids a cache was made for (``<cache>/train_ids.parquet``), sorted."""
    return storage.read_table(storage.path(cache) / TRAIN_IDS, columns=["id"]).column("id").to_pylist()


def decode_images(batch: dict, resolution: int) -> dict:
    """Ray Data CPU stage before the encoder actors: ``image`` (corpus bytes) → ``pixels`` (uint8
    N×r×r×3, a quarter of float32's bytes in the object store). Decoding here, on as many CPU tasks
    as the cluster runs, keeps it out of the GPU actors, which reserve no CPU."""
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = np.stack([load_pixels(b, resolution) for b in batch["image"]])
    return out


class VaeEncoder:
    """Ray Data callable class: loads the VAE once per actor, encodes a batch per call.

    Batch in: ``id``, ``pixels`` (uint8 N×r×r×3, from :func:`decode_images`), ``caption``,
    ``original_size``, ``crop_top_left``. Batch out: ``id``, ``caption``, ``original_size``,
    ``crop_top_left`` (scaled to the training resolution), ``mean`` and ``logvar`` (float16, 4 × r/8 × r/8).
    """

    def __init__(self, cfg: RunConfig):
        import torch

        from medisyn.models import load_vae

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.vae = load_vae(cfg.model).to(self.device, self.dtype).eval()
        self.resolution = cfg.train.resolution
        self.ingest_size = cfg.ingest.size  # the side corpus images (and their crop corners) have

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)  # uint8 over the bus
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0  # to [-1, 1], as models.to_model_input maps
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.dtype)).latent_dist
        scale = self.resolution / self.ingest_size
        crops = np.stack([np.asarray(c, dtype=np.float32) for c in batch["crop_top_left"]]) * scale
        return {
            "id": batch["id"],
            "caption": batch["caption"],
            "original_size": np.stack([np.asarray(s, dtype=np.int32) for s in batch["original_size"]]),
            "crop_top_left": np.rint(crops).astype(np.int32),
            "mean": dist.mean.float().cpu().numpy().astype(np.float16),
            "logvar": dist.logvar.float().cpu().numpy().astype(np.float16),
        }


def _cached_ids(latents: UPath) -> set[str]:
    """Ids already encoded; an unreadable (half-written) file is removed and its ids redone."""
    ids: set[str] = set()
    for f in shard_files(latents):
        try:
            ids.update(storage.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception:
            log.warning("cache: removing unreadable latent shard %s", f.name)
            f.unlink()
    return ids


def encode_text(cfg: RunConfig, captions: list[str], out: str | UPath) -> int:
    """Both encoders' states for "" (row 0) and every caption; only captions not yet cached are
    encoded, the rest are kept as they are. Returns how many were encoded.

    With Ray up (the stage starts it) the work is one Ray task on a worker (a GPU when
    ``train.use_gpu`` and the cluster has one; a CPU otherwise, which the head node does not
    offer), so the driver never loads an encoder; called without Ray, it runs here."""
    import ray

    captions = sorted(set(captions))
    if not ray.is_initialized():
        return _encode_text(cfg.model, captions, storage.uri(out))
    from medisyn.raytools import gpus_available

    task = ray.remote(_encode_text).options(num_cpus=1, num_gpus=1 if gpus_available(cfg.train.use_gpu) else 0)
    return ray.get(task.remote(cfg.model, captions, storage.uri(out)))


def _encode_text(model: ModelConfig, captions: list[str], out: str) -> int:
    """The work of :func:`encode_text`, where it runs: the text encoders alone, fp32, 64 captions a batch."""
    import torch

    from medisyn.models import encode_captions, load_text_encoders

    out = storage.path(out)
    old_caps, old_e, old_p = load_text(out) if out.exists() else ([], None, None)
    known = set(old_caps)
    new = [c for c in ([""] if "" not in known else []) + sorted(set(captions) - known - {""})]
    if not new:
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoders = load_text_encoders(model)
    for module in encoders[2:]:
        module.to(device).eval()
    embeds, pooled = [] if old_e is None else [old_e], [] if old_p is None else [old_p]
    with torch.no_grad():
        for start in range(0, len(new), 64):
            e, p = encode_captions(encoders, new[start : start + 64])
            embeds.append(e.to(torch.float16).cpu().numpy())
            pooled.append(p.to(torch.float16).cpu().numpy())
    texts = old_caps + new
    e, p = np.concatenate(embeds), np.concatenate(pooled)
    check_distinct_encodings(texts, e, p)
    table = pa.table({"caption": texts, "embeds": [x.tobytes() for x in e], "pooled": [x.tobytes() for x in p]})
    table = table.replace_schema_metadata(
        {"embeds_shape": json.dumps(list(e.shape[1:])), "pooled_shape": json.dumps(list(p.shape[1:]))}
    )
    atomic_write_table(table, out)
    return len(new)


def check_distinct_encodings(captions: list[str], embeds: np.ndarray, pooled: np.ndarray) -> None:
    """Every distinct caption (and "") must reach the U-Net as a distinct encoding, or the model
    cannot learn to tell them apart (a caption-word tokenizer maps unknown words to one token;
    CLIP truncates after 77 tokens). Raises ValueError naming the captions that collide."""
    groups: dict[bytes, list[str]] = {}
    for caption, e, p in zip(captions, embeds, pooled, strict=True):
        groups.setdefault(hashlib.sha256(e.tobytes() + p.tobytes()).digest(), []).append(caption)
    same = [g for g in groups.values() if len(g) > 1]
    if same:
        shown = "; ".join(" == ".join(repr(c) for c in g[:3]) for g in same[:5])
        raise ValueError(
            f"cache: {sum(len(g) for g in same)} captions share an encoding with another caption "
            f"({len(same)} groups): {shown}. The text encoders cannot tell them apart; check the "
            "tokenizer's vocabulary and caption length"
        )


def load_text(path: str | UPath):
    """(captions, embeds [C, 77, D], pooled [C, P]) as float16 numpy; row 0 is the empty caption."""
    t = storage.read_table(path)
    meta = t.schema.metadata
    es, ps = json.loads(meta[b"embeds_shape"]), json.loads(meta[b"pooled_shape"])
    embeds = np.stack([np.frombuffer(b, np.float16).reshape(es) for b in t.column("embeds").to_pylist()])
    pooled = np.stack([np.frombuffer(b, np.float16).reshape(ps) for b in t.column("pooled").to_pylist()])
    return t.column("caption").to_pylist(), embeds, pooled


def run(cfg: RunConfig) -> dict:
    import ray
    from ray.data.expressions import col

    from medisyn.raytools import actor_pool, ensure_ray, gpus_available, keep_ids
    from medisyn.train.vae import check_fitted_vae

    check_fitted_vae(cfg)
    corpus = storage.path(cfg.run_dir) / "corpus"
    train = read_corpus(corpus, columns=["id", "caption"], split="train")
    out = cache_dir(cfg)
    latents = out / "latents"
    latents.mkdir(parents=True, exist_ok=True)
    captions = train.column("caption").to_pylist()
    train_ids = sorted(set(train.column("id").to_pylist()))
    ensure_ray()
    encoded = encode_text(cfg, captions, out / "text.parquet")
    done = _cached_ids(latents)
    todo = len(set(train_ids) - done)
    log.info(
        "cache: %d train images, %d cached, %d to encode; %d unique captions (%d newly encoded)",
        train.num_rows,
        len(done),
        todo,
        len(set(captions)),
        encoded,
    )
    if todo:
        use_gpu = gpus_available(cfg.train.use_gpu)
        ds = ray.data.read_parquet(
            [storage.uri(f) for f in shard_files(corpus)],
            columns=["id", "image", "caption", "split", "original_size", "crop_top_left"],
        )
        ds = ds.filter(expr=col("split") == "train")
        if done:  # what a previous run cached: an anti-join against the ids, put in the object store once
            ds = keep_ids(ds, done, drop=True)
        c = cfg.cache
        ds = ds.map_batches(decode_images, fn_kwargs={"resolution": cfg.train.resolution}, batch_size=c.batch_size)
        ds = ds.map_batches(
            VaeEncoder,
            fn_constructor_args=(cfg,),
            batch_size=c.batch_size,
            compute=actor_pool(c.min_actors, c.max_actors, use_gpu),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        ds.write_parquet(storage.uri(latents), max_rows_per_file=cfg.cache.rows_per_file)
    from medisyn.models import vae_scaling_factor

    scaling = vae_scaling_factor(cfg.model)  # from the VAE's config: the driver loads no network
    atomic_write_table(pa.table({"id": pa.array(train_ids, pa.string())}), out / TRAIN_IDS)
    info = {
        "images": len(train_ids),
        "train_count": len(train_ids),
        "train_ids_sha256": ids_digest(train_ids),  # the ids: read_train_ids (train_ids.parquet)
        "captions": len(set(captions)) + 1,
        "resolution": cfg.train.resolution,
        "model": to_dict(cfg.model),
        "scaling_factor": scaling,
    }
    atomic_write_text(json.dumps(info), out / "cache.json")
    print(f"cache: {out}")
    return {"dir": out, "latents_encoded": todo, "captions_encoded": encoded}

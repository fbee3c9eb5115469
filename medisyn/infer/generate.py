"""The ``generate`` stage: prompt sets → PNG files + ``manifest.parquet``, by Ray Data batch inference.

An autoscaling pool of actors (``ActorPoolStrategy(min_actors, max_actors)``; one GPU each on GPU
clusters, CPU actors otherwise) each load the pipeline once and generate batches of prompts
with SDXL's Euler scheduler, guidance 7 and 50 steps by default. The unconditional branch is
the encoding of "" (``negative_prompt=""``), as in training.

Resumable by construction: an image's id and seed are a pure function of (set, prompt,
index); its file is ``<id>.png``, written whole or not at all (a rename locally, one PUT on
an object store), so a retried task or a restarted actor can never leave a half-written or
duplicate image. Each written file's size and SHA-256 come back to the driver and are logged
under ``.written/`` as the run goes; a re-run counts a file as done only when its size matches
that record (or, unrecorded, when it decodes), and makes again any that is missing, truncated
or corrupt. The manifest is rebuilt from the set's expansion, so it lists each requested image
exactly once. When nodes join the cluster, Ray Data grows the pool up to ``max_actors``; when a
node is lost mid-run, its actors are restarted (on a node with room, at the latest when the others
go idle) and their unfinished batches retried, and the run logs which nodes came and went.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from upath import UPath

from medisyn import storage
from medisyn.config import ConfigError, RunConfig
from medisyn.infer.prompts import (
    PromptEntry,
    PromptSet,
    cap_counts,
    class_needs,
    expand,
    load_prompt_set,
    match_to_corpus,
)
from medisyn.infer.sampling import CROP_CONDITIONING, load_sampler, sample
from medisyn.phrases import check_classes, corpus_phrases
from medisyn.records import (
    MANIFEST_SCHEMA,
    atomic_write_bytes,
    atomic_write_table,
    atomic_write_text,
    conditioning_size,
    read_corpus,
    remove_partial_writes,
    sample_corpus,
)

log = logging.getLogger(__name__)
WRITTEN_LOG_ROWS = 256  # images per record part the driver writes as they arrive


@dataclass(frozen=True)
class SetJob:
    """Where one set's images come from and go: what each generation actor needs besides the config."""

    model_dir: str  # exported diffusers pipeline
    out: str  # synthetic/<set>/
    checkpoint: str  # the checkpoint's name, written into every PNG and the manifest


def png_bytes(image: np.ndarray, prompt: str, seed: int, checkpoint: str) -> bytes:
    """PNG with exactly three text chunks (prompt, seed, checkpoint) and no other metadata."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_text("checkpoint", checkpoint)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()


class ImageGenerator:
    """Ray Data callable class: the pipeline loads once per actor; each call makes a batch.

    Batch in: ``id``, ``seed``, ``prompt``, ``original_size``, ``gap_only`` (arrays). Batch out: ``id``, the
    written file's ``bytes`` and ``sha256`` and the image's ``guidance_gap`` (infer.guidance, read off the same
    U-Net calls). Images go straight to ``<out>/<id>.png``; nothing heavy returns to the driver. A batch whose
    rows are ``gap_only`` (their files exist, their gaps were never recorded) runs the first ``gap_steps``
    steps only and writes nothing (``bytes`` -1).
    """

    def __init__(self, cfg: RunConfig, job: SetJob):
        with storage.cached_dir(
            job.model_dir, storage.diffusers_files
        ) as local:  # downloaded once per node from an object store
            self.pipe = load_sampler(local)
        self.out, self.checkpoint, self.settings = storage.path(job.out), job.checkpoint, cfg.generate
        # one marker per actor: shows the pool's size afterwards
        atomic_write_bytes(b"", self.out / ".actors" / f"{os.uname().nodename}-{os.getpid()}")

    def __call__(self, batch: dict) -> dict:
        g = self.settings
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        original_sizes = [(int(h), int(w)) for h, w in batch["original_size"]]
        images: list = [None] * len(prompts)
        gaps: list = [None] * len(prompts)
        for gaps_only in (False, True):  # a batch may hold both kinds: gap-only rows never rewrite a file
            idx = [i for i, flag in enumerate(batch["gap_only"]) if bool(flag) == gaps_only]
            if not idx:
                continue
            made, found = sample(
                self.pipe,
                [prompts[i] for i in idx],
                [seeds[i] for i in idx],
                resolution=g.resolution,
                steps=g.steps,
                guidance_scale=g.guidance_scale,
                original_sizes=[original_sizes[i] for i in idx],
                gap_steps=g.gap_steps,
                gaps_only=gaps_only,
            )
            for i, image, gap in zip(idx, made, found, strict=True):
                images[i], gaps[i] = image, gap
        sizes, digests = [], []
        for image_id, seed, prompt, pixels in zip(batch["id"], seeds, prompts, images, strict=True):
            if pixels is None:  # gap only: the file is there already
                sizes.append(-1)
                digests.append("")
                continue
            data = png_bytes(pixels, prompt, int(seed), self.checkpoint)
            atomic_write_bytes(data, self.out / f"{image_id}.png")
            sizes.append(len(data))
            digests.append(hashlib.sha256(data).hexdigest())
        return {
            "id": batch["id"],
            "bytes": np.asarray(sizes, dtype=np.int64),
            "sha256": np.asarray(digests),
            "guidance_gap": np.asarray([np.nan if v is None else v for v in gaps], dtype=np.float64),
        }


def resolve_set(cfg: RunConfig, name: str, phrases: set | None = None) -> PromptSet:
    """A set by name or path, or ``fid`` (captions of the select stage's real sample), matched and capped.
    ``phrases``: the corpus's (:func:`medisyn.phrases.corpus_phrases`); every label of a named set must be one
    of its specialty and image type, checked before matching (which would drop a prompt no row matches)."""
    if name == "fid":
        counts: dict[tuple, int] = {}
        for r in sample_corpus(cfg.run_path / "corpus", cfg.select.num_images, cfg.seed):
            counts[(r["caption"], r["specialty"])] = counts.get((r["caption"], r["specialty"]), 0) + 1
        pset = PromptSet("fid", tuple(PromptEntry(c, n, s) for (c, s), n in counts.items()))
    else:
        pset = load_prompt_set(name)
        if phrases is not None:
            check_classes(class_needs(pset), phrases, "the corpus's labels")
    if pset.match_corpus and (cfg.run_path / "corpus").is_dir():
        caps = read_corpus(cfg.run_path / "corpus", columns=["caption"], split="train").column("caption").to_pylist()
        pset = match_to_corpus(pset, caps)
    return cap_counts(pset, cfg.generate.max_per_prompt)


def model_dir(cfg: RunConfig) -> UPath:
    path = storage.path(cfg.generate.checkpoint) if cfg.generate.checkpoint else cfg.run_path / "model"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"generate: no exported pipeline at {path} (model_index.json); run `medisyn select` "
            "or set generate.checkpoint to a diffusers pipeline directory"
        )
    return path


def conditioning_sizes(cfg: RunConfig, model: UPath) -> dict[str, list[int]]:
    """``{image_type: [h, w]}`` to condition on: the config's one size, or the model's record."""
    if cfg.generate.original_size:
        return {"*": list(cfg.generate.original_size)}
    meta = json.loads((model / "medisyn.json").read_text()) if (model / "medisyn.json").exists() else {}
    if "original_sizes" not in meta:
        log.warning(
            "generate: %s records no original sizes; conditioning on the output size %d² "
            "(set generate.original_size to choose one)",
            model,
            cfg.generate.resolution,
        )
    return meta.get("original_sizes", {})


def warn_truncation(model: UPath, prompts: list[str]) -> int:
    """CLIP tokenizers drop tokens past 77 without a word: say so, once per prompt."""
    from transformers import AutoTokenizer

    with storage.local_dir(model / "tokenizer") as local:  # the tokenizer only, never the weights
        tok = AutoTokenizer.from_pretrained(local)
    long = [p for p in prompts if len(tok(p).input_ids) > tok.model_max_length]
    for p in long:
        log.warning("generate: prompt longer than %d tokens is truncated: %r", tok.model_max_length, p[:80])
    return len(long)


def checkpoint_name(model: UPath) -> str:
    if (model / "medisyn.json").exists():
        return json.loads((model / "medisyn.json").read_text())["checkpoint"]
    return model.name


def prompt_set_identity(pset: PromptSet) -> str:
    """The set's name and a digest of its file's bytes: what it says, not where it sits (a Ray job
    runs from a new temporary copy of the project each time, so a path would differ every job)."""
    if pset.source and Path(pset.source).is_file():
        data = Path(pset.source).read_bytes()
    else:
        data = json.dumps([asdict(e) for e in pset.entries], sort_keys=True).encode()
    return f"{pset.name} (sha256 {hashlib.sha256(data).hexdigest()[:16]})"


def producer(cfg: RunConfig, pset: PromptSet, model: UPath) -> dict:
    """What makes a set's images: the prompt set's source, the model (path, checkpoint, and the
    U-Net weights file's size and time) and every generation setting that changes pixels."""
    g = cfg.generate
    weights = sorted((model / "unet").glob("*.safetensors")) or sorted((model / "unet").glob("*.bin"))
    stat = [[w.name, *storage.stat_ns(w)] for w in weights]
    return {
        "prompt_set": prompt_set_identity(pset),
        "model": storage.uri(model),
        "checkpoint": checkpoint_name(model),
        "unet_weights": stat,
        "scheduler": g.scheduler,
        "guidance_scale": g.guidance_scale,
        "steps": g.steps,
        "resolution": g.resolution,
        "original_size": list(g.original_size),
        # how sampling conditions on the crop (sampling.crop_conditioning): a set begun under SDXL's
        # (0, 0), as before 2026-12-06, is refused rather than finished with other conditioning
        "crop_conditioning": CROP_CONDITIONING,
        # not pixels but the manifest's guidance_gap: gaps over other steps would not compare
        "gap_steps": g.gap_steps,
    }


ADDED_LATER = ("gap_steps",)  # producer keys a set begun before they existed may lack: recorded, not refused


def check_producer(out: UPath, want: dict) -> None:
    """A set folder holds the images of one producer: a rerun with anything else refuses, naming
    what differs, instead of mixing old images with a manifest that claims the new settings."""
    record = out / "set.json"
    if not record.is_file():
        return
    have = json.loads(record.read_text())
    differs = [k for k in want if have.get(k) != want[k] and not (k in ADDED_LATER and k not in have)]
    if differs:
        detail = "; ".join(f"{k}: {have.get(k)!r} then, {want[k]!r} now" for k in differs)
        raise ConfigError(
            f"generate: synthetic/{out.name} was made by other settings ({detail}). Give this set another name "
            f"(the prompt file's `name:`), or delete {out} to make it again"
        )


def _decodes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure to decode means the file is not whole
        return False


WRITTEN = ".written"  # parquet parts of (id, bytes, sha256, guidance_gap), logged by the driver as images arrive


def _written(out: UPath) -> tuple[dict[str, tuple[int, str]], dict[str, float]]:
    """``{id: (bytes, sha256)}`` of the images this set's writers recorded, in any earlier run, and
    ``{id: guidance gap}`` of those whose gap was recorded (a manifest or part from before the gap has none)."""
    records: dict[str, tuple[int, str]] = {}
    gaps: dict[str, float] = {}
    tables = [storage.read_table(out / "manifest.parquet")] if (out / "manifest.parquet").is_file() else []
    tables += [storage.read_table(part) for part in sorted((out / WRITTEN).glob("*.parquet"))]
    for t in tables:
        if "sha256" not in t.column_names:
            continue
        ids = t.column("id").to_pylist()
        for i, n, h in zip(ids, *(t.column(c).to_pylist() for c in ("bytes", "sha256")), strict=True):
            if h and n is not None and n >= 0:  # bytes -1: a gap-only row, no file written
                records[i] = (n, h)
        if "guidance_gap" in t.column_names:
            for i, gap in zip(ids, t.column("guidance_gap").to_pylist(), strict=True):
                if gap is not None and np.isfinite(gap):
                    gaps[i] = gap
    return records, gaps


def whole_images(out: UPath, jobs: list, records: dict[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    """The jobs' images already in ``out`` and whole: the size a writer recorded, or (unrecorded)
    a file that decodes. Any other file named by a job's id is deleted, logged and made again."""
    present = storage.sizes(out)
    whole = {}
    for j in jobs:
        size = present.get(f"{j.id}.png")
        if size is None:
            continue
        if j.id in records:
            ok = records[j.id][0] == size
            rec = records[j.id]
        else:
            data = (out / f"{j.id}.png").read_bytes()
            ok, rec = _decodes(data), (len(data), hashlib.sha256(data).hexdigest())
        if ok:
            whole[j.id] = rec
        else:
            log.warning("generate %s: %s.png is not whole (%d bytes on disk); making it again", out.name, j.id, size)
            (out / f"{j.id}.png").unlink(missing_ok=True)
    return whole


def _nodes() -> dict[str, bool]:
    """``{node id: alive}`` of every node the cluster knows, dead ones included."""
    import ray

    return {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}


def log_node_changes(name: str, before: dict[str, bool], after: dict[str, bool], made: int, todo: int) -> None:
    """Say which nodes joined and which left while the set was generated (a node that joined and
    then left counts as both)."""
    joined = [n for n in after if n not in before]
    left = [n for n, alive in after.items() if not alive and before.get(n) is not False]
    if joined:
        log.info("generate %s: %d node(s) joined the cluster during the run: %s", name, len(joined), joined)
    if left:
        log.warning(
            "generate %s: %d node(s) left the cluster during the run: %s; Ray restarted the actors it lost "
            "there and retried their unfinished batches (%d of %d images made)",
            name,
            len(left),
            left,
            made,
            todo,
        )


def generate_set(cfg: RunConfig, pset: PromptSet, model: UPath, want: dict) -> dict:
    """One set's missing images and its manifest; ``want`` is its producer, already checked."""
    import ray

    from medisyn.raytools import ensure_ray, gpus_available

    g = cfg.generate
    checkpoint = want["checkpoint"]
    out = cfg.run_path / "synthetic" / pset.name
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "set.json").is_file():  # check_producer has refused any other producer
        atomic_write_text(json.dumps(want, indent=2), out / "set.json")
    else:  # a set begun before a key existed: record it now, so a later change of it is refused
        have = json.loads((out / "set.json").read_text())
        if any(k not in have for k in ADDED_LATER):
            atomic_write_text(json.dumps(have | {k: want[k] for k in ADDED_LATER}, indent=2), out / "set.json")
    warn_truncation(model, [e.prompt for e in pset.entries])
    sizes = conditioning_sizes(cfg, model)
    remove_partial_writes(out)  # writes a killed actor did not finish
    jobs = expand(pset)
    size_of = {j.id: conditioning_size(sizes, j.image_type, g.resolution) for j in jobs}
    records, gap_of = _written(out)
    done = whole_images(out, jobs, records)
    # by conditioning size (stable): a batch of one size is one pipeline call (sampling.sample)
    todo = sorted((j for j in jobs if j.id not in done), key=lambda j: size_of[j.id])
    # an image whose file is whole but whose gap no record holds (a writer stopped before the driver logged
    # it, or a set made before the gap): its gap alone, from the first gap_steps steps of the same sampling
    gap_todo = (
        sorted((j for j in jobs if j.id in done and j.id not in gap_of), key=lambda j: size_of[j.id])
        if g.guidance_scale > 1
        else []
    )
    log.info(
        "generate %s: %d images requested, %d present, %d to make, %d present images' guidance gaps to compute",
        pset.name,
        len(jobs),
        len(jobs) - len(todo),
        len(todo),
        len(gap_todo),
    )
    if todo or gap_todo:
        ensure_ray()
        use_gpu = gpus_available(cfg.train.use_gpu)
        # one block per batch: blocks are what the pool hands out, so new actors find work waiting
        ds = ray.data.from_items(
            [
                {"id": j.id, "seed": j.seed, "prompt": j.prompt, "original_size": list(size_of[j.id]), "gap_only": only}
                for only, part in ((False, todo), (True, gap_todo))
                for j in part
            ],
            override_num_blocks=max(1, -(-(len(todo) + len(gap_todo)) // g.batch_size)),
        )
        ds = ds.map_batches(
            ImageGenerator,
            batch_size=g.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else g.cpus_per_actor,
            fn_constructor_args=(cfg, SetJob(storage.uri(model), storage.uri(out), checkpoint)),
        )
        # An actor whose node is lost is restarted and its unfinished batches retried, never failed:
        # Ray Data 2.60 creates pool actors with max_restarts=-1, max_task_retries=-1 (passing them
        # here is deprecated `ray_remote_args`); the two-node test kills a node mid-run and fails if a
        # release changes that. Writes are whole files named by id, so a batch made twice still leaves
        # each image once.
        nodes = _nodes()
        made = 0
        for batch in ds.iter_batches(batch_size=WRITTEN_LOG_ROWS, batch_format="pyarrow"):
            atomic_write_table(batch, out / WRITTEN / f"{uuid.uuid4().hex}.parquet")  # survives a stopped job
            ids, sizes, digests, gaps = (batch.column(c).to_pylist() for c in ("id", "bytes", "sha256", "guidance_gap"))
            for i, n, h, gap in zip(ids, sizes, digests, gaps, strict=True):
                if n >= 0:
                    done[i] = (n, h)
                    made += 1
                if gap is not None and np.isfinite(gap):
                    gap_of[i] = gap
        log.info("generate %s: made %d images", pset.name, made)
        log_node_changes(pset.name, nodes, _nodes(), made, len(todo))
    rows = [
        {
            **{k: v for k, v in asdict(j).items()},
            "labels": list(j.labels),
            "file": f"{j.id}.png",
            "checkpoint": checkpoint,
            "guidance_scale": g.guidance_scale,
            "steps": g.steps,
            "scheduler": g.scheduler,
            "original_size": list(size_of[j.id]),
            "bytes": done[j.id][0] if j.id in done else None,
            "sha256": done[j.id][1] if j.id in done else None,
            "guidance_gap": gap_of.get(j.id),  # None: guidance off (guidance_scale <= 1)
        }
        for j in jobs
    ]
    missing = [r["file"] for r in rows if r["sha256"] is None]
    if missing:
        raise RuntimeError(f"generate {pset.name}: {len(missing)} images missing after the run; re-run to finish them")
    table = pa.Table.from_pylist(rows, MANIFEST_SCHEMA)
    sheet = out / "contact_sheet.png"
    # a resubmitted job: the set is finished
    if not todo and not gap_todo and _unchanged(out, table) and sheet.is_file():
        print(f"generate {pset.name}: already done, {len(rows)} images in {out}")
        return {"set": pset.name, "images": len(rows), "made": 0, "dir": out}
    atomic_write_table(table, out / "manifest.parquet")
    storage.remove_tree(out / WRITTEN)  # now in the manifest
    sheet = contact_sheet_for(out, rows)
    print(f"generate {pset.name}: {len(rows)} images in {out} (manifest.parquet, {sheet.name})")
    return {"set": pset.name, "images": len(rows), "made": len(todo), "dir": out}


def _unchanged(out: UPath, table: pa.Table) -> bool:
    """The set's manifest already says exactly this (and no writer log waits to be folded in)."""
    if not (out / "manifest.parquet").is_file() or any((out / WRITTEN).glob("*.parquet")):
        return False
    return storage.read_table(out / "manifest.parquet").equals(table)


def contact_sheet_for(out: UPath, rows: list[dict], per_prompt: int = 4) -> UPath:
    """A few images per prompt, captioned: the picture the report shows (a file that no longer
    decodes is left out with a warning, never a traceback)."""
    from medisyn.figures import contact_sheet

    picked, seen = [], {}
    for r in rows:
        if seen.get(r["prompt"], 0) < per_prompt:
            data = (out / r["file"]).read_bytes()
            if not _decodes(data):
                log.warning("generate %s: %s does not decode; left out of the contact sheet", out.name, r["file"])
                continue
            seen[r["prompt"]] = seen.get(r["prompt"], 0) + 1
            picked.append((data, r["prompt"]))
    path = out / "contact_sheet.png"
    buf = io.BytesIO()
    contact_sheet(picked, per_row=per_prompt).save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), path)
    return path


def run(cfg: RunConfig) -> list[dict]:
    try:  # the classes of every set checked against the corpus's labels; a run without a corpus cannot check
        phrases = corpus_phrases(cfg.run_path / "corpus")
    except FileNotFoundError:
        phrases = None
        log.info("generate: no corpus at %s; prompt labels not checked against its phrases", cfg.run_path / "corpus")
    sets = [resolve_set(cfg, name, phrases) for name in cfg.generate.sets]  # every set validated before any image
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        named = ", ".join(map(repr, repeated))
        raise ConfigError(f"generate.sets: more than one set is named {named}; set names must differ")
    model = model_dir(cfg)
    wants = [producer(cfg, s, model) for s in sets]
    for s, want in zip(sets, wants, strict=True):  # and every set's folder free for it (or made by the same settings)
        check_producer(cfg.run_path / "synthetic" / s.name, want)
    return [generate_set(cfg, s, model, want) for s, want in zip(sets, wants, strict=True)]

"""The ``generate`` stage: prompt sets → PNG files + ``manifest.parquet``, by Ray Data batch inference.

An autoscaling pool of actors (``ActorPoolStrategy(min_actors, max_actors)``; one GPU each on GPU
clusters, CPU actors otherwise) each load the pipeline once and generate batches of prompts
with SDXL's Euler scheduler, guidance 7 and 50 steps by default. The unconditional branch is
the encoding of "" (``negative_prompt=""``), as in training.

Resumable by construction: an image's id and seed are a pure function of (set, prompt,
index); its file is ``<id>.png``, written through a temporary name and a rename, so a retried
task or a restarted actor can never leave a half-written or duplicate image; a re-run
generates only the ids whose file is missing, and the manifest is rebuilt from the set's
expansion, so it lists each requested image exactly once. When nodes join the cluster, Ray
Data grows the pool up to ``max_actors``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from medisyn.config import ConfigError, RunConfig
from medisyn.infer.prompts import PromptEntry, PromptSet, cap_counts, expand, load_prompt_set, match_to_corpus
from medisyn.infer.sampling import generate_images, load_sampler
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

    Batch in: ``id``, ``seed``, ``prompt``, ``original_size`` (arrays). Batch out: ``id`` and ``written`` (1 per
    image). Images go straight to ``<out>/<id>.png``; nothing heavy returns to the driver.
    """

    def __init__(self, cfg: RunConfig, job: SetJob):
        self.pipe = load_sampler(job.model_dir)
        self.out, self.checkpoint, self.settings = Path(job.out), job.checkpoint, cfg.generate
        (self.out / ".actors").mkdir(exist_ok=True)  # one marker per actor: shows the pool's size afterwards
        (self.out / ".actors" / f"{os.uname().nodename}-{os.getpid()}").touch()

    def __call__(self, batch: dict) -> dict:
        g = self.settings
        prompts = [str(p) for p in batch["prompt"]]
        images = generate_images(
            self.pipe,
            prompts,
            [int(s) for s in batch["seed"]],
            resolution=g.resolution,
            steps=g.steps,
            guidance_scale=g.guidance_scale,
            original_sizes=[(int(h), int(w)) for h, w in batch["original_size"]],
        )
        for image_id, seed, prompt, pixels in zip(batch["id"], batch["seed"], prompts, images, strict=True):
            atomic_write_bytes(png_bytes(pixels, prompt, int(seed), self.checkpoint), self.out / f"{image_id}.png")
        return {"id": batch["id"], "written": np.ones(len(prompts), dtype=np.int64)}


def resolve_set(cfg: RunConfig, name: str) -> PromptSet:
    """A set by name or path, or ``fid`` (captions of the select stage's real sample), matched and capped."""
    if name == "fid":
        counts: dict[tuple, int] = {}
        for r in sample_corpus(cfg.run_path / "corpus", cfg.select.num_images, cfg.seed):
            counts[(r["caption"], r["specialty"])] = counts.get((r["caption"], r["specialty"]), 0) + 1
        pset = PromptSet("fid", tuple(PromptEntry(c, n, s) for (c, s), n in counts.items()))
    else:
        pset = load_prompt_set(name)
    if pset.match_corpus and (cfg.run_path / "corpus").is_dir():
        caps = read_corpus(cfg.run_path / "corpus", columns=["caption"], split="train").column("caption").to_pylist()
        pset = match_to_corpus(pset, caps)
    return cap_counts(pset, cfg.generate.max_per_prompt)


def model_dir(cfg: RunConfig) -> Path:
    path = Path(cfg.generate.checkpoint) if cfg.generate.checkpoint else cfg.run_path / "model"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"generate: no exported pipeline at {path} (model_index.json); run `medisyn select` "
            "or set generate.checkpoint to a diffusers pipeline directory"
        )
    return path


def conditioning_sizes(cfg: RunConfig, model: Path) -> dict[str, list[int]]:
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


def warn_truncation(model: Path, prompts: list[str]) -> int:
    """CLIP tokenizers drop tokens past 77 without a word: say so, once per prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    long = [p for p in prompts if len(tok(p).input_ids) > tok.model_max_length]
    for p in long:
        log.warning("generate: prompt longer than %d tokens is truncated: %r", tok.model_max_length, p[:80])
    return len(long)


def checkpoint_name(model: Path) -> str:
    if (model / "medisyn.json").exists():
        return json.loads((model / "medisyn.json").read_text())["checkpoint"]
    return model.name


def producer(cfg: RunConfig, pset: PromptSet, model: Path) -> dict:
    """What makes a set's images: the prompt set's source, the model (path, checkpoint, and the
    U-Net weights file's size and time) and every generation setting that changes pixels."""
    g = cfg.generate
    weights = sorted((model / "unet").glob("*.safetensors")) or sorted((model / "unet").glob("*.bin"))
    stat = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    return {
        "prompt_set": pset.source or pset.name,
        "model": str(model.resolve()),
        "checkpoint": checkpoint_name(model),
        "unet_weights": stat,
        "scheduler": g.scheduler,
        "guidance_scale": g.guidance_scale,
        "steps": g.steps,
        "resolution": g.resolution,
        "original_size": list(g.original_size),
    }


def check_producer(out: Path, want: dict) -> None:
    """A set folder holds the images of one producer: a rerun with anything else refuses, naming
    what differs, instead of mixing old images with a manifest that claims the new settings."""
    record = out / "set.json"
    if not record.is_file():
        return
    have = json.loads(record.read_text())
    differs = [k for k in want if have.get(k) != want[k]]
    if differs:
        detail = "; ".join(f"{k}: {have.get(k)!r} then, {want[k]!r} now" for k in differs)
        raise ConfigError(
            f"generate: synthetic/{out.name} was made by other settings ({detail}). Give this set another name "
            f"(the prompt file's `name:`), or delete {out} to make it again"
        )


def generate_set(cfg: RunConfig, pset: PromptSet, model: Path, want: dict) -> dict:
    """One set's missing images and its manifest; ``want`` is its producer, already checked."""
    import ray

    from medisyn.raytools import ensure_ray, gpus_available

    g = cfg.generate
    checkpoint = want["checkpoint"]
    out = cfg.run_path / "synthetic" / pset.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(want, indent=2), out / "set.json")
    warn_truncation(model, [e.prompt for e in pset.entries])
    sizes = conditioning_sizes(cfg, model)
    remove_partial_writes(out)  # writes a killed actor did not finish
    jobs = expand(pset)
    size_of = {j.id: conditioning_size(sizes, j.image_type, g.resolution) for j in jobs}
    todo = [j for j in jobs if not (out / f"{j.id}.png").is_file()]
    log.info(
        "generate %s: %d images requested, %d present, %d to make",
        pset.name,
        len(jobs),
        len(jobs) - len(todo),
        len(todo),
    )
    if todo:
        ensure_ray()
        use_gpu = gpus_available(cfg.train.use_gpu)
        # one block per batch: blocks are what the pool hands out, so new actors find work waiting
        ds = ray.data.from_items(
            [{"id": j.id, "seed": j.seed, "prompt": j.prompt, "original_size": list(size_of[j.id])} for j in todo],
            override_num_blocks=max(1, -(-len(todo) // g.batch_size)),
        )
        ds = ds.map_batches(
            ImageGenerator,
            batch_size=g.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else g.cpus_per_actor,
            fn_constructor_args=(cfg, SetJob(str(model), str(out), checkpoint)),
        )
        made = sum(int(r["written"]) for r in ds.iter_rows())
        log.info("generate %s: made %d images", pset.name, made)
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
        }
        for j in jobs
    ]
    missing = [r["file"] for r in rows if not (out / r["file"]).is_file()]
    if missing:
        raise RuntimeError(f"generate {pset.name}: {len(missing)} images missing after the run; re-run to finish them")
    atomic_write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA), out / "manifest.parquet")
    sheet = contact_sheet_for(out, rows)
    print(f"generate {pset.name}: {len(rows)} images in {out} (manifest.parquet, {sheet.name})")
    return {"set": pset.name, "images": len(rows), "made": len(todo), "dir": out}


def contact_sheet_for(out: Path, rows: list[dict], per_prompt: int = 4) -> Path:
    """A few images per prompt, captioned: the picture the report shows."""
    from medisyn.figures import contact_sheet

    picked, seen = [], {}
    for r in rows:
        if seen.get(r["prompt"], 0) < per_prompt:
            seen[r["prompt"]] = seen.get(r["prompt"], 0) + 1
            picked.append(((out / r["file"]).read_bytes(), r["prompt"]))
    path = out / "contact_sheet.png"
    contact_sheet(picked, per_row=per_prompt).save(path)
    return path


def run(cfg: RunConfig) -> list[dict]:
    sets = [resolve_set(cfg, name) for name in cfg.generate.sets]  # every set validated before any image
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

"""The ``audit-fidelity`` stage: do the synthetic images show what their prompt asked for?

The paper asked clinicians (the reader study). This is the automatic counterpart, run for every
synthetic set: a classifier trained on real train images labels each synthetic image, by
specialty and by class (image type + findings), and the report shows, per specialty and per
class, the share labelled as prompted — next to the same classifier's recall on real test
images, the ceiling the synthetic share is read against.

The classifier learns each real train image twice: as it is, and as the model's own VAE renders
it (encoded and decoded at ``train.resolution``). A U-Net can only draw what its decoder can
render; a classifier that never saw the decoder's rendering marks down a correct but blurred
image for the blur. On the demo's tiny VAE that cost 7-18 points of specialty share (two runs,
66% -> 84% and 77% -> 84%, real test recall unchanged at 98-99%); through SDXL's VAE the two
views are nearly the same image. The decoded real test images are scored too
(``real_test_decoded``): what a U-Net that drew real images exactly could reach.

Features are 16×16 colour thumbnails (``features: thumbnail``: enough for the phantoms, no
network) or the memorization audit's image embedder (``features: embedder``: BiomedCLIP on real
runs — a linear probe); the classifier is scikit-learn's multinomial logistic regression on
standardised features. One Ray task (a GPU where there is one) reads the corpus and the sets
itself and writes ``audit/fidelity.json``; only the summary comes back.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict

import numpy as np

from medisyn.config import RunConfig
from medisyn.configtools import to_dict
from medisyn.records import (
    atomic_write_text,
    corpus_identity,
    finished_with,
    read_corpus,
    read_images,
    read_manifest,
    set_identity,
)

log = logging.getLogger(__name__)


def class_key(specialty: str, image_type: str, labels) -> str:
    """One class per (specialty, image type, set of findings); label order does not matter."""
    return f"{specialty} / {image_type}: {' + '.join(sorted(labels))}"


def thumbnails(images: list[bytes], size: int = 16) -> np.ndarray:
    """Encoded images -> [n, size*size*3] float features in [0, 1] (antialiased downsampling)."""
    from PIL import Image

    out = np.zeros((len(images), size * size * 3), dtype=np.float32)
    for i, data in enumerate(images):
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BOX)
        out[i] = np.asarray(im, dtype=np.float32).reshape(-1) / 255.0
    return out


def embeddings(images: list[bytes], embedder: str, batch_size: int = 64) -> np.ndarray:
    """Encoded images -> unit-length embeddings, by the memorization audit's ``Embedder``."""
    from medisyn.audit.embeddings import Embedder, preprocess_images

    embed = Embedder(embedder)
    chunks = []
    for start in range(0, len(images), batch_size):  # decoded here, as the audit's CPU stage does before its actors
        pixels = preprocess_images({"id": [], "image": images[start : start + batch_size]}, embed.preprocess)
        chunks.append(np.stack(embed(pixels)["embedding"]))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


def fit_classifier(features: np.ndarray, labels: list[str], seed: int = 0):
    """Standardised features -> multinomial logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(labels)) < 2:
        raise ValueError(f"fidelity: the real train images have {len(set(labels))} class(es); need at least 2")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    return clf.fit(features, labels)


def share_as_labelled(clf, features: np.ndarray, labels: list[str]) -> dict:
    """Overall and per-label share of images the classifier labels as their given label
    (on real test images: recall; on synthetic images: the share that shows the prompt)."""
    if not len(labels):
        return {"n": 0, "share": float("nan"), "by_label": {}}
    predicted = clf.predict(features)
    hits = defaultdict(list)
    for want, got in zip(labels, predicted, strict=True):
        hits[want].append(want == got)
    return {
        "n": len(labels),
        "share": float(np.mean([h for v in hits.values() for h in v])),
        "by_label": {k: {"n": len(v), "share": float(np.mean(v))} for k, v in sorted(hits.items())},
    }


def prompt_fidelity(real_train: dict, real_test: dict, synthetic: dict[str, dict], seed: int = 0) -> dict:
    """The check itself, on features already computed.

    Each argument holds ``features`` ([n, d]) and the targets (``specialty``, ``class``: lists of
    n strings); ``synthetic`` maps a set name to such a dict, its targets being what was prompted.
    Synthetic images of a class the real train split lacks are counted as not shown.
    """
    out: dict = {"real_test": {}, "sets": {name: {} for name in synthetic}}
    for target in ("specialty", "class"):
        clf = fit_classifier(real_train["features"], real_train[target], seed)
        out["real_test"][target] = share_as_labelled(clf, real_test["features"], real_test[target])
        for name, s in synthetic.items():
            out["sets"][name][target] = share_as_labelled(clf, s["features"], s[target])
    return out


def decoded(images: list[bytes], vae, resolution: int, batch_size: int = 8) -> list[bytes]:
    """Encoded images -> the same images as ``vae`` renders them at ``resolution`` (the VAE stage's
    own reconstruction, as PNG bytes, so every feature extractor reads them as it reads the rest)."""
    import torch
    from PIL import Image

    from medisyn.images import decode_batch, encode_image
    from medisyn.models import reconstruct, to_model_input, to_uint8

    out: list[bytes] = []
    for start in range(0, len(images), batch_size):
        pixels = decode_batch({"image": images[start : start + batch_size]}, resolution)["pixels"]
        with torch.no_grad():
            recon = to_uint8(reconstruct(vae, to_model_input(pixels, vae.device)))
        out += [encode_image(Image.fromarray(a), "png", 1) for a in recon]
    return out


def _real(cfg: RunConfig, split: str, cap: int) -> dict:
    """Rows of a split, at most ``cap`` per class (a seeded draw), with their image bytes: the draw is
    made on the metadata (the corpus index), and only the drawn images are read."""
    corpus = cfg.run_path / "corpus"
    table = read_corpus(corpus, columns=["id", "specialty", "image_type", "labels"], split=split).to_pylist()
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(table):
        by_class[class_key(r["specialty"], r["image_type"], r["labels"])].append(i)
    rng = np.random.default_rng(cfg.seed)
    keep = sorted(
        i for idx in by_class.values() for i in (rng.choice(idx, cap, replace=False) if cap and len(idx) > cap else idx)
    )
    rows = [table[i] for i in keep]
    images = read_images(corpus, [r["id"] for r in rows])
    return {
        "images": [images[r["id"]] for r in rows],
        "specialty": [r["specialty"] for r in rows],
        "class": [class_key(r["specialty"], r["image_type"], r["labels"]) for r in rows],
    }


def _synthetic(cfg: RunConfig, name: str) -> dict:
    folder = cfg.run_path / "synthetic" / name
    rows = read_manifest(folder, ["file", "specialty", "image_type", "labels"]).to_pylist()
    missing = [r for r in rows if not r["specialty"] or not r["image_type"]]
    if missing:
        raise ValueError(
            f"audit-fidelity: set {name!r} has {len(missing)} images whose prompt names no specialty or image "
            "type; fidelity needs both (add them to the prompt set)"
        )
    return {
        "images": [(folder / r["file"]).read_bytes() for r in rows],
        "specialty": [r["specialty"] for r in rows],
        "class": [class_key(r["specialty"], r["image_type"], r["labels"]) for r in rows],
    }


def fidelity_task(cfg: RunConfig, inputs: dict) -> dict:
    """Ray task: read, featurise, fit, score; write ``audit/fidelity.json`` (with its ``inputs``)."""
    import torch

    from medisyn.models import load_vae

    f = cfg.audit_fidelity
    parts = {"train": _real(cfg, "train", f.real_per_class), "test": _real(cfg, "test", 0)}
    vae = load_vae(cfg.model).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    for split in ("train", "test"):  # the decoder's view of the real images (module docstring)
        real = parts[split]
        parts[f"{split}:decoded"] = {**real, "images": decoded(real["images"], vae, cfg.train.resolution)}
    del vae
    parts |= {f"set:{name}": _synthetic(cfg, name) for name in f.sets}
    for part in parts.values():
        if f.features == "thumbnail":
            part["features"] = thumbnails(part.pop("images"), f.thumbnail_size)
        else:
            part["features"] = embeddings(part.pop("images"), cfg.audit_memorization.embedder)
    train, decoded_train = parts["train"], parts["train:decoded"]
    both = {
        "features": np.concatenate([train["features"], decoded_train["features"]]),
        **{key: train[key] + decoded_train[key] for key in ("specialty", "class")},
    }
    sets = {name: parts[f"set:{name}"] for name in f.sets}
    result = prompt_fidelity(both, parts["test"], {**sets, "test:decoded": parts["test:decoded"]}, seed=cfg.seed)
    result["real_test_decoded"] = result["sets"].pop("test:decoded")
    result |= {
        "features": f.features if f.features == "thumbnail" else f"embedder {cfg.audit_memorization.embedder}",
        "real_train_images": len(train["specialty"]),
        "real_test_images": len(parts["test"]["specialty"]),
        "inputs": inputs,
    }
    out = cfg.run_path / "audit" / "fidelity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2), out)
    return result


def run(cfg: RunConfig) -> dict:
    import ray

    from medisyn.models import model_identity
    from medisyn.raytools import ensure_ray, gpus_available

    f = cfg.audit_fidelity
    out = cfg.run_path / "audit" / "fidelity.json"
    inputs = {  # every set present before any work
        "sets": {name: set_identity(cfg.run_path / "synthetic" / name) for name in f.sets},
        "corpus": corpus_identity(cfg.run_path / "corpus"),
        "settings": to_dict(f),
        "embedder": cfg.audit_memorization.embedder if f.features == "embedder" else None,
        "decoder": model_identity(cfg.model, cfg.train.resolution),  # a refit VAE renders the real images anew
        "seed": cfg.seed,
    }
    result = finished_with(out, inputs)
    if result is not None:
        print(f"audit-fidelity: already done for these sets, corpus and settings ({out})")
        return result
    ensure_ray()
    gpus = 1 if gpus_available(cfg.train.use_gpu) else 0  # the VAE's view of the real images, the embedder
    result = ray.get(ray.remote(num_gpus=gpus, num_cpus=1)(fidelity_task).remote(cfg, inputs))
    real, real_decoded = result["real_test"], result["real_test_decoded"]
    print(
        f"audit-fidelity: {result['features']} features; real test images labelled correctly: "
        f"specialty {real['specialty']['share']:.0%}, class {real['class']['share']:.0%} "
        f"(as the model's VAE renders them: {real_decoded['specialty']['share']:.0%}, "
        f"{real_decoded['class']['share']:.0%})"
    )
    for name, s in result["sets"].items():
        print(
            f"  {name}: shown as prompted: specialty {s['specialty']['share']:.0%}, class {s['class']['share']:.0%} "
            f"({s['specialty']['n']} images)"
        )
        for sp, v in s["specialty"]["by_label"].items():
            ceiling = real["specialty"]["by_label"].get(sp, {}).get("share", float("nan"))
            print(f"    {sp:18s} {v['share']:5.0%} of {v['n']:4d}   (real test: {ceiling:.0%})")
    print(f"audit-fidelity: {cfg.run_path / 'audit' / 'fidelity.json'}")
    return result

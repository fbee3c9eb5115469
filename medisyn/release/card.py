"""The release's card: a Hugging Face README (YAML header + body) and a Croissant JSON-LD file.

Both are filled from the run alone: the source repositories and their licences (the ingest catalog's
entries the corpus holds), the model and its training settings, and every audit figure the release
record carries (``figures``), each with its bounds, plus what the audits cannot show. Neither names a
patient, a source path or a matched real image.
"""

from __future__ import annotations

import datetime

import pyarrow.compute as pc
import yaml

from medisyn.config import RunConfig
from medisyn.records import read_corpus

CANNOT_SHOW = (
    "The memorization audit finds copies only as near as its embedder's top-k and its patch-distance threshold "
    "see: a copy that the embedder does not rank near its source, or that differs by more than the threshold "
    "(rotated, cropped, recoloured), is not caught.",
    "Images the audit did not look at (it samples images per prompt) are left out, not vouched for.",
    "The guidance gap flags prompts the model may have memorised, not individual copies; it is null for images "
    "made without classifier-free guidance or before it was recorded.",
    "No differential-privacy guarantee: passing the audits bounds what they measure, nothing more.",
    "Prompt fidelity is an automatic classifier's reading, not a clinician's; its ceiling is its own recall on "
    "real test images.",
)


def size_category(n: int) -> str:
    """Hugging Face's ``size_categories`` bucket of a row count."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def sources_used(cfg: RunConfig, corpus) -> list[dict]:
    """The source repositories the corpus holds images of, with publisher, licence and access from the
    ingest catalog (a run of ``ingest.repositories`` records no licence: said so)."""
    names = sorted(pc.unique(read_corpus(corpus, ["source"]).column("source")).to_pylist())
    catalog = {}
    if cfg.ingest.sources:
        from medisyn.ingest.describe import load_catalog

        catalog = {e.name: e for e in load_catalog(cfg.ingest.sources, cfg.ingest.source_settings)}
    out = []
    for n in names:
        e = catalog.get(n)
        out.append(
            {
                "name": n,
                "repository": e.repository if e else n,
                "publisher": e.publisher if e else "",
                "licence": e.licence if e else "not recorded (ingest.repositories gives no licence)",
                "access": e.access if e else "",
                "download": e.download if e else "",
            }
        )
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def _values(values: list) -> str:
    return " / ".join(format(v, "g") if isinstance(v, float) else str(v) for v in values) or "n/a"


def licence_of(cfg: RunConfig) -> str:
    return cfg.release.licence or "other"


def readme(cfg: RunConfig, name: str, figures: dict, sources: list[dict], model: str, files: list[str]) -> str:
    """README.md: the YAML header the Hub reads, then how the data was made and what the audits show."""
    r, t, g = cfg.release, cfg.train, figures
    header = {
        "license": licence_of(cfg),
        "pretty_name": f"MediSyn synthetic medical images: {name}",
        "task_categories": ["text-to-image", "image-classification"],
        "size_categories": [size_category(g["rows"])],
        "tags": ["medical", "synthetic", "medisyn"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    if not r.licence:
        header["license_name"] = "source-licences"
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {header['pretty_name']}",
        "",
        f"{g['rows']} synthetic images ({', '.join(f'{k}: {v}' for k, v in sorted(g['by_specialty'].items()))}), "
        f"made by a text-to-image diffusion model fine-tuned on public medical image repositories, released by "
        f"`medisyn release` after its audits. Load it with "
        f'`datasets.load_dataset("parquet", data_dir="{name}/data", split="train")`.',
        "",
        "## How the data was made",
        "",
        f"- Model: {model}; preset `{cfg.model.preset}`, the SDXL U-Net fine-tuned ({t.epochs} epochs, "
        f"resolution {t.resolution}, learning rate {t.learning_rate:g}, effective batch {t.effective_batch}, "
        f"{t.caption_dropout:g} of captions empty for guidance).",
        f"- Sampling: {_values(g['sampling']['scheduler'])} scheduler, {_values(g['sampling']['steps'])} steps, "
        f"guidance scale {_values(g['sampling']['guidance_scale'])}; each image's seed and prompt are in its row.",
        "- Columns: image, id, prompt, specialty, image_type, labels, seed, model, distance and relative_distance "
        "(to the nearest training image, from the memorization audit), guidance_gap, fidelity_label (null: the "
        "fidelity audit reports shares, not a label per image). The matched training image is never named.",
        "",
        "## Sources and their licences",
        "",
        "| repository | publisher | licence | access |",
        "|---|---|---|---|",
        *(f"| {s['repository']} | {s['publisher']} | {s['licence']} | {s['access']} |" for s in sources),
        "",
        (
            f"Licence of this release: {r.licence}."
            if r.licence
            else "Licence: other. The images derive from the sources above: their licences and terms apply to "
            "this release as to a derivative, the most restrictive of them first."
        ),
        "",
        "## What was left out",
        "",
        f"{sum(g['left_out'].values())} image(s) left out: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(g["left_out"].items())) or "none")
        + f". {g['corpus_images_hashed']} corpus images were hashed (bytes and pixels); none is in the release.",
        "",
    ]
    lines += _audit_sections(g)
    lines += ["## What the audits cannot show", "", *(f"- {x}" for x in CANNOT_SHOW), ""]
    lines += ["## Intended use", "", r.intended_use, ""]
    lines += ["## Files", "", *(f"- `{f}`" for f in files), "- `croissant.json` (Croissant 1.0 with RAI fields)", ""]
    return "\n".join(lines)


def _audit_sections(g: dict) -> list[str]:
    out = ["## Memorization", ""]
    m = g.get("memorization")
    if m is None:
        out += ["Not audited for these images (release.require did not ask for it).", ""]
    else:
        out += [
            f"Nearest training image by embedding, then patch distance (4×4 grid); a pair at or below "
            f"{m['threshold']} is a possible copy. Flag rate with its one-sided 95% Clopper–Pearson upper bound.",
            "",
            "| images | pairs | distance mean ± sd | min | flagged | rate | 95% upper bound |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = [("all", m["overall"]), *sorted(m["by_specialty"].items())]
        rows += [(f"control: {k.split(':', 1)[1]}", v) for k, v in sorted(m["controls"].items())]
        for label, v in rows:
            out.append(
                f"| {label} | {v['pairs']} | {_num(v['mean'])} ± {_num(v['sd'])} | {_num(v['min'])} | {v['flagged']} "
                f"| {_pct(v['flagged_pct'] / 100)} | {_pct(v['flagged_rate_upper95'])} |"
            )
        out += [
            "",
            f"One-sided Mann–Whitney p that synthetic images are closer to training than held-out real images: "
            f"{_num(m.get('p_closer_than_test_control'), '.3g')}. Flagged images are not in the release.",
            "",
        ]
    gap = {sp: v for sp, v in g.get("guidance_gap", {}).items() if v.get("n")}
    out += ["## Guidance gap", ""]
    if gap:
        out += ["| specialty | n | median | p90 | max |", "|---|---|---|---|---|"]
        out += [f"| {sp} | {v['n']} | {v['median']:.4f} | {v['p90']:.4f} | {v['max']:.4f} |" for sp, v in gap.items()]
    else:
        out += ["Not recorded for these images."]
    out += [""]
    f = g.get("fidelity")
    out += ["## Prompt fidelity", ""]
    if f is None:
        out += ["Not audited for these images.", ""]
    else:
        out += [
            f"A classifier trained on real training images ({f['features']}) labels each synthetic image. "
            f"Shown as prompted: specialty {_pct(f['specialty'])}, class {_pct(f['class'])} (real test images: "
            f"{_pct(f['real_test']['specialty'])}, {_pct(f['real_test']['class'])}).",
            "",
            "| specialty | images | shown as prompted | real test (ceiling) |",
            "|---|---|---|---|",
            *(
                f"| {sp} | {v['n']} | {_pct(v['share'])} | {_pct(v['real_test'])} |"
                for sp, v in f["by_specialty"].items()
            ),
            "",
        ]
    u = g.get("utility")
    out += ["## Utility", ""]
    if u is None:
        out += ["No utility audit in this run.", ""]
    else:
        which = "these images" if u["same_images"] else f"set(s) {', '.join(u['sets'])} of the same model"
        out += [f"Test macro-AUROC differences with paired bootstrap 95% CIs (seed 0), measured on {which}.", ""]
        out += ["| task | comparison | difference (95% CI) |", "|---|---|---|"]
        for task, comps in sorted(u["tasks"].items()):
            for c in comps:
                d, lo, hi = c["difference"]
                out.append(f"| {task} | {c['a']} − {c['b']} | {d:+.3f} ({lo:+.3f}, {hi:+.3f}) |")
        out += [""]
    return out


CONTEXT = {  # Croissant 1.0's JSON-LD context (mlcroissant's make_context), with the RAI vocabulary
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
FIELDS = (  # (column, Croissant data type, description)
    ("id", "sc:Text", "the image's id: a hash of set, prompt and index"),
    ("prompt", "sc:Text", "the caption the image was generated from"),
    ("specialty", "sc:Text", "medical specialty the prompt names"),
    ("image_type", "sc:Text", "imaging modality the prompt names"),
    ("labels", "sc:Text", "findings the prompt names"),
    ("seed", "sc:Integer", "the sampling seed"),
    ("model", "sc:Text", "checkpoint and weights digest of the model that made it"),
    ("distance", "sc:Float", "patch distance to the nearest training image (memorization audit)"),
    ("relative_distance", "sc:Float", "distance over half the mean distance to the audit's k candidates"),
    ("guidance_gap", "sc:Float", "mean norm of the conditional minus unconditional noise prediction, first steps"),
    ("fidelity_label", "sc:Text", "the fidelity audit's label for the image (null: not recorded per image)"),
)


def croissant(cfg: RunConfig, name: str, figures: dict, sources: list[dict], model: str, files: list[str]) -> dict:
    """croissant.json: the parquet shards as a FileSet and one RecordSet, with the RAI fields from the run."""
    g, r = figures, cfg.release
    m, f = g.get("memorization"), g.get("fidelity")
    licences = "; ".join(f"{s['repository']}: {s['licence']}" for s in sources)
    mem = (
        f"Memorization audit: {m['overall']['flagged']} of {m['overall']['pairs']} audited images flagged at patch "
        f"distance <= {m['threshold']} (95% upper bound {_pct(m['overall']['flagged_rate_upper95'])}); flagged "
        "images are left out."
        if m
        else "No memorization audit."
    )
    field = [
        {
            "@type": "cr:Field",
            "@id": "default/image",
            "name": "default/image",
            "description": "the synthetic image (PNG bytes)",
            "dataType": "sc:ImageObject",
            # the column is datasets' Image struct {bytes, path}: the record reads its bytes
            "source": {
                "fileSet": {"@id": "parquet-files"},
                "extract": {"column": "image"},
                "transform": {"jsonPath": "bytes"},
            },
        }
    ]
    field += [
        {
            "@type": "cr:Field",
            "@id": f"default/{col}",
            "name": f"default/{col}",
            "description": text,
            "dataType": dtype,
            "source": {"fileSet": {"@id": "parquet-files"}, "extract": {"column": col}},
            **({"repeated": True} if col == "labels" else {}),
        }
        for col, dtype, text in FIELDS
    ]
    return {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": name,
        "description": f"{g['rows']} synthetic medical images released by medisyn after its audits.",
        "license": r.licence or f"other: the source repositories' licences apply ({licences})",
        "url": f"https://huggingface.co/datasets/{name}",  # where it is meant to be published; edit before upload
        "datePublished": datetime.date.today().isoformat(),
        "version": "1.0.0",
        "citeAs": f"MediSyn synthetic set {name}",
        "isBasedOn": [s["download"] or s["repository"] for s in sources],
        "distribution": [
            {
                "@type": "cr:FileSet",
                "@id": "parquet-files",
                "name": "parquet-files",
                "description": "the train split's Parquet shards",
                "encodingFormat": "application/x-parquet",
                "includes": "data/*.parquet",
            }
        ],
        "recordSet": [{"@type": "cr:RecordSet", "@id": "default", "name": "default", "field": field}],
        "rai:dataCollection": (
            f"Generated by {model} (preset {cfg.model.preset}, fine-tuned on {len(sources)} public medical image "
            f"repositories) from class prompts; {_values(g['sampling']['steps'])} sampling steps, guidance "
            f"{_values(g['sampling']['guidance_scale'])}."
        ),
        "rai:dataCollectionType": ["Synthetic data generation"],
        "rai:dataPreprocessingProtocol": [
            "Source images resized to a 512-pixel shorter side and centre-cropped; CT windowed (700/100), MRI and "
            "mammograms percentile-clipped; patient-level train/val/test split; captions from labels by template.",
            f"Released images: left out when not decodable, identical to a corpus image, flagged by the memorization "
            f"audit, over the guidance-gap limit or not audited ({sum(g['left_out'].values())} left out).",
        ],
        "rai:dataBiases": [
            "The images follow the source repositories' populations, devices and label frequencies, and the "
            "prompt set's class counts, not any clinical population.",
            mem,
        ],
        "rai:dataLimitations": list(CANNOT_SHOW)
        + (
            [f"Prompt fidelity (automatic): specialty {_pct(f['specialty'])}, class {_pct(f['class'])}."]
            if f
            else ["Prompt fidelity not audited."]
        ),
        "rai:personalSensitiveInformation": (
            "None by construction: no patient identifier, source path or DICOM header value is in any row; the "
            "images are synthetic, and images matching a training image by hash or by the memorization audit are "
            "left out. The audits bound but cannot exclude memorised training content."
        ),
        "rai:dataUseCases": [r.intended_use],
        "rai:dataSocialImpact": (
            "Meant to let medical image data be shared in place of patient images; misuse as real clinical "
            "evidence is the main risk."
        ),
        "rai:dataReleaseMaintenancePlan": "Released once per audited set; a changed set or audit is a new release.",
    }

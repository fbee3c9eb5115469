"""The ``report`` stage: one HTML page of what a run produced, pictures first.

Each section reads one stage's outputs and is skipped, with a note, when that stage has not
run. The page is one self-contained file: every figure is embedded as a ``data:`` URI and
nothing refers to another file or the network, so it can be mailed, attached to a release or
copied off a cluster alone. Only captions and counts appear — never a source path or an
identifier.
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medisyn.config import RunConfig  # noqa: E402
from medisyn.figures import contact_sheet, data_uri, png_bytes  # noqa: E402
from medisyn.records import atomic_write_bytes, read_corpus, read_manifest  # noqa: E402
from medisyn.stages import STAGES  # noqa: E402
from medisyn.storage import path as store_path  # noqa: E402

log = logging.getLogger(__name__)
PAPER_PAIRS = {  # DESIGN §2: the paper's pairs per specialty (train, val, test)
    "radiology": (367_779, 48_091, 45_887),
    "surgery": (245_000, 29_250, 29_948),
    "pathology": (154_659, 20_007, 19_009),
    "ophthalmology": (128_744, 15_166, 16_836),
    "dermatology": (36_929, 4_661, 4_645),
    "gastroenterology": (89_080, 11_135, 11_136),
}


def embed(image: bytes, alt: str) -> str:
    """An ``<img>`` that carries its picture (an encoded image's bytes) in the page itself."""
    return f'<img src="{data_uri(image)}" alt="{html.escape(alt)}">'


def embed_chart(fig, alt: str, dpi: int = 110) -> str:
    """A matplotlib figure embedded as PNG, then closed."""
    data = png_bytes(fig, dpi=dpi)
    plt.close(fig)
    return embed(data, alt)


def embed_file(path: Path, alt: str) -> str:
    """The figure a stage wrote, embedded; nothing when that stage's run did not write it (older runs)."""
    return embed(path.read_bytes(), alt) if path.exists() else ""


def corpus_samples(corpus: Path, per_class: int = 4) -> dict[str, list[tuple[bytes, str]]]:
    """Up to ``per_class`` train images per caption, grouped by specialty, read shard by shard.

    Picks rows from the small columns first, then reads only those rows' images.
    """
    meta = read_corpus(corpus, columns=["id", "caption"], split="train").to_pylist()
    seen: dict[str, int] = defaultdict(int)
    wanted = []
    for row in meta:
        if seen[row["caption"]] < per_class:
            seen[row["caption"]] += 1
            wanted.append(row["id"])
    table = read_corpus(corpus, columns=["id", "image", "caption", "specialty"], ids=wanted)
    by_id = {row["id"]: row for row in table.to_pylist()}
    out: dict[str, list[tuple[bytes, str]]] = defaultdict(list)
    for image_id in wanted:
        row = by_id[image_id]
        out[row["specialty"]].append((row["image"], row["caption"]))
    return dict(sorted(out.items()))


def split_chart(summary: dict) -> str:
    """Pairs per specialty and split: ours beside the paper's shares (Extended Data Table 1)."""
    specs = list(summary["by_specialty"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (title, counts) in zip(
        axes,
        [
            ("this run", {s: [summary["by_specialty"][s][k] for k in ("train", "val", "test")] for s in specs}),
            ("the paper", {s: list(PAPER_PAIRS.get(s, (0, 0, 0))) for s in specs}),
        ],
        strict=True,
    ):
        left = [0] * len(specs)
        for i, split in enumerate(("train", "val", "test")):
            vals = [counts[s][i] for s in specs]
            ax.barh(specs, vals, left=left, label=split)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set_title(f"image-caption pairs: {title}")
        ax.invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    return embed_chart(fig, "pairs by specialty")


def _table(rows: dict[str, dict[str, int]], first: str) -> str:
    head = f"<tr><th>{html.escape(first)}</th><th>train</th><th>val</th><th>test</th><th>total</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{v[c]:,}</td>" for c in ("train", "val", "test", "total"))
        + "</tr>"
        for k, v in rows.items()
    )
    return f"<table>{head}{body}</table>"


def ingest_section(cfg: RunConfig) -> str:
    summary_file = cfg.run_path / "ingest" / "summary.json"
    if not summary_file.exists():
        return "<h2>Corpus</h2><p class=todo>ingest has not run.</p>"
    summary = json.loads(summary_file.read_text())
    parts = [
        "<h2>Corpus</h2>",
        f"<p>{summary['pairs']['total']:,} image–caption pairs (train {summary['pairs']['train']:,}, "
        f"val {summary['pairs']['val']:,}, test {summary['pairs']['test']:,}); split by patient.</p>",
        split_chart(summary),
    ]
    for spec, samples in corpus_samples(cfg.run_path / "corpus").items():
        sheet = embed(png_bytes(contact_sheet(samples)), spec)
        parts.append(f"<h3>{html.escape(spec)}: training images by caption</h3>{sheet}")
    if "captions" in summary:  # ingest summaries before issue #36 have no caption counts
        parts.append(captions_block(summary["captions"]))
    if "by_specialty_image_type" in summary:  # ingest summaries before this table have only the marginals
        parts += [
            "<h3>Pairs by specialty, image type and split</h3>",
            _table(summary["by_specialty_image_type"], "specialty / image type"),
        ]
    parts += [
        "<h3>Pairs by image type</h3>",
        _table(summary["by_image_type"], "image type"),
        "<h3>Pairs by class</h3>",
        _table(summary["by_class"], "image type: class"),
    ]
    acc = summary["accounting"]
    drops = [("rejected", summary["rejects"]), ("duplicates removed", summary["duplicates"])]
    parts.append(
        f"<h3>Nothing lost</h3><p>{acc['files_listed']:,} source files listed; {acc['corpus']:,} images in the "
        f"corpus, {acc['duplicates']:,} duplicates, {acc['rejected']:,} rejected, {acc['background']:,} "
        "background patches"
        + (f"; {acc['left_out']:,} left out by the catalog's rules" if acc.get("left_out") else "")
        + ".</p>"
    )
    left_out = {f"{entry}: {why}": n for entry, v in summary.get("left_out", {}).items() for why, n in v.items()}
    drops.append(("left out by the catalog's rules (filters, caps, masks, unlabelled files)", left_out))
    for title, reasons in drops:
        if reasons:
            rows = "".join(f"<tr><td>{n:,}</td><td>{html.escape(r)}</td></tr>" for r, n in reasons.items())
            parts.append(f"<p>{title}:</p><table><tr><th>files</th><th>reason</th></tr>{rows}</table>")
    skipped = summary.get("skipped", {})
    if skipped:
        rows = "".join(f"<li><b>{html.escape(e)}</b>: {html.escape(why)}</li>" for e, why in skipped.items())
        parts.append(f"<p>catalog entries not read:</p><ul>{rows}</ul>")
    return "\n".join(parts)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return html.escape(str(v))
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def _is_rows(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _leaf_rows(block: dict, path: tuple[str, ...] = ()):
    """(path, the scalar fields) of each mapping in a nested JSON block, depth first; a list of mappings
    (a task's comparisons) gives a row each, named "a − b" where it has those fields."""
    scalars = {k: v for k, v in block.items() if not isinstance(v, dict) and not _is_rows(v)}
    if scalars:
        yield path, scalars
    for k, v in block.items():
        if isinstance(v, dict):
            yield from _leaf_rows(v, (*path, str(k)))
        elif _is_rows(v):
            for i, x in enumerate(v):
                yield from _leaf_rows(x, (*path, str(k), f"{x['a']} − {x['b']}" if {"a", "b"} <= x.keys() else str(i)))


def stats_table(block: dict, first: str) -> str:
    """A nested JSON block (per set, per specialty, …) as a line of its own numbers and a table: a row per
    mapping of numbers, named by its path, a column per field. Drawn without knowing the block's shape, so
    a stage may add fields and the report shows them."""
    rows = list(_leaf_rows(block))
    lead = ""
    if rows and rows[0][0] == ():
        lead = (
            f"<p>{html.escape(first)}: "
            + "; ".join(f"{html.escape(str(k))} {_cell(v)}" for k, v in rows.pop(0)[1].items())
            + "</p>"
        )
    if not rows:
        return lead
    cols = list(dict.fromkeys(k for _, r in rows for k in r))
    head = f"<tr><th>{html.escape(first)}</th>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(' / '.join(p))}</td>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>"
        for p, r in rows
    )
    return f"{lead}<table>{head}{body}</table>"


def captions_block(captions: dict) -> str:
    """How many images share each caption: duplicated captions drive copying (Somepalli et al. 2023)."""
    row = "<tr><td>{}</td><td>{:,}</td></tr>".format
    top = "".join(row(html.escape(c), n) for c, n in captions.get("top", []))
    hist = "".join(row(html.escape(b), n) for b, n in captions.get("histogram", {}).items())
    return (
        f"<h3>Train images per caption</h3><p>{captions['distinct']:,} distinct captions. A caption that many train "
        "images share is one the model sees most often, and duplicated captions drive copying; the memorization "
        "audit reports its flag rate by this count.</p>"
        + (f"<table><tr><th>images per caption</th><th>captions</th></tr>{hist}</table>" if hist else "")
        + (f"<p>The most shared:</p><table><tr><th>caption</th><th>images</th></tr>{top}</table>" if top else "")
    )


def caption_share_block(summary: dict) -> str:
    """The memorization audit's flag rate by how many train images share the matched image's caption;
    nothing for audits written before it."""
    block = {k: e["by_caption_share"] for k, e in summary["by_kind"].items() if "by_caption_share" in e}
    if "by_caption_share" in summary:
        block = summary["by_caption_share"]
    if not block:
        return ""
    return "<h3>Flags by how many train images share the matched image's caption</h3>" + stats_table(
        block, "images / train images sharing the caption"
    )


def guidance_gap_block(summary: dict, folder: Path) -> str:
    """The second signal, recorded at generation: the gap between conditional and unconditional noise
    predictions over the first steps (Wen et al. 2024); nothing for runs before it."""
    block, figure = summary.get("guidance_gap"), embed_file(folder / "guidance_gap.png", "guidance gap per specialty")
    if not block and not figure:
        return ""
    return (
        "<h3>Guidance gap</h3><p>Per image, the mean over the first sampling steps of the norm of the difference "
        "between the conditional and the unconditional noise prediction (Wen et al., ICLR 2024): large where a "
        "prompt pulls the sampler to one memorised image. It flags prompts, not images, and needs no real image.</p>"
        + (stats_table(block, "set / specialty") if isinstance(block, dict) else "")
        + figure
    )


def vae_section(cfg: RunConfig) -> str:
    """The fitted VAE (demo runs): val reconstruction error against the mean-colour baseline."""
    record = store_path(cfg.model.vae) / "fit.json" if cfg.model.vae else None
    if not cfg.vae_fit.enabled or record is None or not record.exists():
        return ""
    fit = json.loads(record.read_text())
    verdict = "beats" if fit["beats_baseline"] else "does <b>not</b> beat"
    side, res = fit.get("input_side"), fit.get("fingerprint", {}).get("resolution")
    crops = f" on random {side}² crops of the {res}² images" if side and res and side < res else ""
    parts = [
        "<h3>VAE fitted to the corpus</h3>",
        f"<p>Reconstruction MSE on {fit['val_images']} whole val images: <b>{fit['val_mse']:.4f}</b>, which "
        f"{verdict} the mean-colour baseline {fit['baseline_mse']:.4f} (each image replaced by its mean colour); "
        f"{fit['epochs']} epochs{crops}; latent scaling factor {fit['scaling_factor']:.3f} (from the data).</p>",
    ]
    curve = fit.get("val_mse_by_epoch")
    if curve:
        per_epoch = ", ".join(f"{v:.4f}" for v in curve)
        parts.append(
            f"<p>Kept: epoch {fit['epoch']} of {len(curve)}, the lowest val MSE of the fit (by epoch: {per_epoch}).</p>"
        )
    parts.append(embed_file(record.parent / "reconstructions.png", "val images and their reconstructions"))
    return "\n".join(parts)


def fidelity_section(cfg: RunConfig) -> str:
    """Share of synthetic images a real-trained classifier labels as prompted, next to its real recall."""
    path = cfg.run_path / "audit" / "fidelity.json"
    if not path.exists():
        return "<h2>Prompt fidelity</h2><p class=todo>audit-fidelity has not run.</p>"
    fid = json.loads(path.read_text())
    real, decoded = fid["real_test"], fid["real_test_decoded"]
    parts = [
        "<h2>Prompt fidelity</h2>",
        f"<p>A classifier ({html.escape(fid['features'])} features, logistic regression) trained on "
        f"{fid['real_train_images']:,} real train images, each also as the model's VAE renders it (a U-Net "
        f"draws only what its decoder can render), labels each synthetic image; real test images "
        f"({fid['real_test_images']:,}) give its ceiling: specialty {real['specialty']['share']:.0%}, "
        f"class {real['class']['share']:.0%} correct; as the VAE renders them "
        f"{decoded['specialty']['share']:.0%} and {decoded['class']['share']:.0%}.</p>",
    ]
    for name, s in fid["sets"].items():
        for target in ("specialty", "class"):
            labels = sorted(s[target]["by_label"])
            synth = [s[target]["by_label"][k]["share"] for k in labels]
            ceiling = [real[target]["by_label"].get(k, {}).get("share", float("nan")) for k in labels]
            fig, ax = plt.subplots(figsize=(7, 0.28 * len(labels) + 1.2))
            y = range(len(labels))
            ax.barh([i + 0.2 for i in y], ceiling, height=0.4, color="#bbb", label="real test images")
            ax.barh([i - 0.2 for i in y], synth, height=0.4, color="#3a7", label=f"synthetic ({name})")
            ax.set_yticks(list(y), [k[:60] for k in labels], fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_xlabel("share labelled as prompted (real: as labelled)")
            ax.legend(fontsize=7, loc="lower right")
            fig.tight_layout()
            parts.append(
                f"<h3>{html.escape(name)} by {target}: {s[target]['share']:.0%} of {s[target]['n']:,} images shown "
                f"as prompted</h3>" + embed_chart(fig, f"fidelity by {target}")
            )
    return "\n".join(parts)


def memorization_section(cfg: RunConfig) -> str:
    """Table 1 per kind (synthetic sets and the two controls), the histograms and the gallery."""
    folder = cfg.run_path / "audit" / "memorization"
    if not (folder / "summary.json").exists():
        return "<h2>Memorization audit</h2><p class=todo>audit-memorization has not run.</p>"
    summary = json.loads((folder / "summary.json").read_text())
    t, m = summary["threshold"], cfg.audit_memorization
    head = (
        "<tr><th>images</th><th>specialty</th><th>pairs</th><th>distance mean ± sd</th>"
        f"<th>≤ {t}</th><th>%</th><th>95% upper bound</th><th>min</th><th>1st pct</th>"
        f"<th>Wilcoxon p (&gt; {t})</th></tr>"
    )
    rows = []
    for kind, entry in summary["by_kind"].items():
        for sp, v in [*entry["by_specialty"].items(), ("all", entry["overall"])]:
            rows.append(
                f"<tr><td>{html.escape(kind)}</td><td>{html.escape(sp)}</td><td>{v['pairs']}</td>"
                f"<td>{v['mean']:.3f} ± {v['sd']:.3f}</td><td>{v['flagged']}</td><td>{v['flagged_pct']:.1f}</td>"
                f"<td>{v['flagged_rate_upper95']:.2%}</td><td>{v['min']:.3f}</td><td>{v['p1']:.3f}</td>"
                f"<td>{v['wilcoxon_p_above']:.2g}</td></tr>"
            )
    notes = []
    for kind, entry in summary["by_kind"].items():
        if kind.startswith("synthetic"):
            p_closer = entry.get("p_closer_than_test_control", float("nan"))
            notes.append(
                f"{html.escape(kind)}: {entry['distinct_train_images_matched']} distinct train images matched, at "
                f"most {entry['most_matches_to_one_train_image']} synthetic images to one; "
                f"{entry['match_not_embedding_top1']} matches were not the embedding's top-1 (re-ranked by pixels); "
                f"one-sided p that synthetic images are closer to train than held-out test images: {p_closer:.2g}."
            )
            series = entry.get("by_series")
            if series:
                notes.append(
                    f"{html.escape(kind)}, CT/MR: {series['flagged']} of {series['pairs']} pairs flagged, in "
                    f"{series['series_with_flagged']} of the {series['series_matched']} train series matched (at most "
                    f"{series['most_flagged_in_one_series']} flags in one series)"
                )
            buckets = entry.get("by_match_near_duplicates", {})
            if buckets:
                notes.append(
                    f"{html.escape(kind)}, flagged by how many copies of the matched train image ingest dropped as "
                    "duplicates: "
                    + "; ".join(
                        f"{b}: {v['flagged']} of {v['pairs']} ({v['flagged_pct']:.1f}%)" for b, v in buckets.items()
                    )
                )
    parts = [
        "<h2>Memorization audit</h2>",
        f"<p>Nearest train image of the same specialty and image type (exact search over "
        f"{html.escape(m.embedder)} embeddings, {m.k} neighbours re-ranked by the {m.grid}×{m.grid} patch "
        f"distance); a pair at or below {t} is flagged. Controls: held-out real test images, and train images "
        "with themselves left out.</p>",
        f"<table>{head}{''.join(rows)}</table>",
        "<p>" + "<br>".join(notes) + "</p>",
    ]
    for name, alt in (("histograms.png", "distance histograms"), ("gallery.png", "flagged and closest pairs")):
        parts.append(embed_file(folder / name, alt))
    parts.append(caption_share_block(summary))
    parts.append(guidance_gap_block(summary, folder))
    return "\n".join(parts)


def utility_section(cfg: RunConfig) -> str:
    """The paper's Figure 5 and its CI table per task, with seed spread and the control arm."""
    folder = cfg.run_path / "audit" / "utility"
    if not (folder / "summary.json").exists():
        return "<h2>Utility audit</h2><p class=todo>audit-utility has not run.</p>"
    summary = json.loads((folder / "summary.json").read_text())
    labels = summary["arm_labels"]
    parts = [
        "<h2>Utility audit</h2>",
        f"<p>{html.escape(summary['arch'])} ({html.escape(summary['weights'])}), {summary['image_size']}² inputs, "
        f"{summary['epochs']} epochs{' (equal optimizer steps per arm)' if summary['equal_steps'] else ''}, the "
        f"best-validation epoch tested; {summary['seeds']} seed(s) per arm, each fixing the subset draw, "
        f"initialisation and data order. CIs: {summary['bootstrap_resamples']:,} paired bootstrap resamples of the "
        "test set (seed 0, as the paper) and a seed × test-case bootstrap over all seeds. Arm (iv) uses arm (ii)'s "
        "real images twice: (iii) − (iv) is what synthetic images add beyond more samples.</p>",
    ]
    for name, t in summary["tasks"].items():
        rows = "".join(
            f"<tr><td>{html.escape(labels[arm])}</td><td>{v['size']}</td><td>{v['mean']:.3f} ± {v['sd']:.3f}</td>"
            f"<td>{' '.join(f'{a:.3f}' for a in v['auroc'])}</td><td>{sum(v['steps']) / len(v['steps']):.0f}</td>"
            f"<td>{' '.join(str(e) for e in v['best_epoch'])}</td>"
            f"<td style='text-align:left;font-size:85%'>"
            f"{'; '.join(f'{html.escape(c)} {a:.2f}' for c, a in v['per_class'].items())}</td></tr>"
            for arm, v in t["arms"].items()
        )
        diffs = []
        for c in t["comparisons"]:
            key = f"{c['a']}-{c['b']}"
            paper = t["paper"].get(key)
            paper_text = f"{paper[0]:+.3f} ({paper[1]:+.3f}, {paper[2]:+.3f})" if paper else "—"
            d, lo, hi = c["paper_style"]
            d2, lo2, hi2 = c["two_level"]
            delong = "; ".join(
                f"{html.escape(cls)} {v['diff']:+.3f} ({v['lo']:+.3f}, {v['hi']:+.3f})"
                for cls, v in c["delong_seed0"].items()
            )
            diffs.append(
                f"<tr><td>{html.escape(labels[c['a']].split(' ')[0])} − {html.escape(labels[c['b']].split(' ')[0])}"
                f"</td><td>{d:+.3f} ({lo:+.3f}, {hi:+.3f})</td><td>{d2:+.3f} ({lo2:+.3f}, {hi2:+.3f})</td>"
                f"<td>{paper_text}</td>"
                f"<td style='text-align:left;font-size:85%'>{delong}</td></tr>"
            )
        parts += [
            f"<h3>{html.escape(name)} ({t['kind']}, {len(t['classes'])} classes; {t['n_val']} val, "
            f"{t['n_test']} test images)</h3>",
            "<table><tr><th>arm</th><th>train samples</th><th>test macro AUROC, mean ± sd</th><th>per seed</th>"
            f"<th>optimizer steps</th><th>best epoch</th><th>per class (mean over seeds)</th></tr>{rows}</table>",
            "<table><tr><th>difference</th><th>seed 0, 95% CI</th><th>over seeds, 95% CI</th>"
            "<th>paper (its data)</th><th>per class, DeLong 95% CI (seed 0)</th></tr>" + "".join(diffs) + "</table>",
        ]
        parts.append(embed_file(folder / t["roc"], f"{name} ROC curves"))
    return "\n".join(parts)


def training_section(cfg: RunConfig) -> str:
    logs = sorted((cfg.run_path / "train_log").glob("epoch-*-rank-0.json"))
    if not logs:
        return "<h2>Training</h2><p class=todo>train has not run.</p>" + vae_section(cfg)
    epochs = [json.loads(f.read_text()) for f in logs]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([e["epoch"] for e in epochs], [e["loss"] for e in epochs], marker="o")
    ax.set_xlabel("epoch")
    target = "velocity" if cfg.model.prediction_type == "v_prediction" else "noise"
    weighted = f"Min-SNR (γ {cfg.train.snr_gamma:g}) " if cfg.train.snr_gamma else ""
    ax.set_ylabel(f"{weighted}MSE on predicted {target} (rank 0)", fontsize=8)
    fig.tight_layout()
    last = epochs[-1]
    parts = [
        "<h2>Training</h2>",
        vae_section(cfg),
        embed_chart(fig, "training loss"),
        f"<p>{len(epochs)} epochs, {last['step']:,} optimizer steps, effective batch {last['effective_batch']}, "
        f"{last['samples_per_s']:.1f} samples/s in the last epoch; caption dropout drawn per step "
        f"({last['dropped_fraction']:.1%} of samples in the last epoch).</p>",
    ]
    selection_file = cfg.run_path / "selection.json"
    if selection_file.exists() and json.loads(selection_file.read_text()).get("criterion") == "last":
        sel = json.loads(selection_file.read_text())
        parts += [
            f"<h3>Checkpoint selection: the last epoch, {html.escape(sel['best'])}</h3>",
            "<p><code>select.criterion: last</code>: no FID was computed (the offline demo's stand-in extractor "
            "has random weights and measures nothing about the prompts). Exported: "
            f"<code>{html.escape(sel['exported'].rstrip('/').rsplit('/', 1)[-1])}/</code> — loads with "
            "<code>StableDiffusionXLPipeline.from_pretrained</code>.</p>",
        ]
    elif selection_file.exists():
        sel = json.loads(selection_file.read_text())
        specs = sorted({k for c in sel["checkpoints"] for k in c["fid_by_specialty"]})
        head = "<tr><th>checkpoint</th><th>FID</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in specs) + "</tr>"
        rows = "".join(
            f"<tr><td>{c['checkpoint']}{' (best)' if c['checkpoint'] == sel['best'] else ''}</td>"
            f"<td>{c['fid']:.4g}</td>"
            + "".join(f"<td>{c['fid_by_specialty'].get(s, float('nan')):.4g}</td>" for s in specs)
            + "</tr>"
            for c in sel["checkpoints"]
        )
        parts += [
            f"<h3>Checkpoint selection: FID over {sel['num_images']:,} images</h3>",
            f"<p>Feature extractor: {html.escape(sel['feature_extractor'])}.</p>",
            f"<table>{head}{rows}</table>",
            f"<p>Exported: <code>{html.escape(sel['exported'].rstrip('/').rsplit('/', 1)[-1])}/</code> — loads with "
            "<code>StableDiffusionXLPipeline.from_pretrained</code>.</p>",
        ]
    return "\n".join(parts)


def synthetic_section(cfg: RunConfig) -> str:
    sets = sorted(p for p in (cfg.run_path / "synthetic").glob("*") if (p / "manifest.parquet").exists())
    if not sets:
        return "<h2>Synthetic sets</h2><p class=todo>generate has not run.</p>"
    parts = ["<h2>Synthetic sets</h2>"]
    if cfg.model.preset == "tiny":
        vae = "a VAE fitted to the phantoms" if cfg.vae_fit.enabled else "a random VAE"
        parts.append(
            f"<p class=todo>Tiny preset: {vae}, random (fixed) text encoders and a small U-Net trained for "
            "minutes on phantom images — a demonstration of the pipeline on the offline corpus, not what MediSyn "
            "draws from real data.</p>"
        )
    for d in sets:
        m = read_manifest(d, columns=["prompt", "steps", "guidance_scale", "checkpoint"]).to_pylist()
        parts.append(
            f"<h3>{html.escape(d.name)}: {len(m):,} images, {len({r['prompt'] for r in m})} prompts, "
            f"{m[0]['steps']} Euler steps, guidance {m[0]['guidance_scale']}, checkpoint "
            f"{html.escape(m[0]['checkpoint'])}</h3>" + embed_file(d / "contact_sheet.png", d.name)
        )
    return "\n".join(parts)


def _file_names(files) -> list[str]:
    """The release record's files as names inside the release (a record may hold paths)."""
    items = files.keys() if isinstance(files, dict) else files or []
    names = [str(f.get("path") or f.get("name") or "") if isinstance(f, dict) else str(f) for f in items]
    return [n.split("/release/", 1)[-1] for n in names]


def release_section(cfg: RunConfig) -> str:
    """What each ``medisyn release`` shared: rows, what was left out and why, and the card's figures,
    all from the stage's record ``release/<name>.json`` (the shards are never read here)."""
    head = "<h2>Release</h2>"
    records = sorted((cfg.run_path / "release").glob("*.json"))
    if not records:
        return (
            f"{head}<p class=todo>No release was made. <code>medisyn release --config FILE release.set=NAME</code> "
            "writes an audited synthetic set as Parquet shards that <code>datasets</code> loads, with a dataset card "
            '(README, "Sharing a synthetic set").</p>'
        )
    parts = [
        head,
        "<p>Images of a synthetic set that passed the release policy, as Parquet shards with a dataset card "
        "(<code>README.md</code>, <code>croissant.json</code>); the images left out are listed beside the release, "
        "not in it.</p>",
    ]
    for path in records:
        rec = json.loads(path.read_text())
        name = path.stem
        left = rec.get("left_out") or {}
        parts.append(
            f"<h3>{html.escape(name)}: {rec['rows']:,} images released, {sum(left.values()):,} left out</h3>"
            f"<p>In <code>release/{html.escape(name)}/</code>; left out: <code>release/{html.escape(name)}"
            ".left_out.parquet</code>.</p>"
        )
        if left:
            rows = "".join(f"<tr><td>{html.escape(r)}</td><td>{n:,}</td></tr>" for r, n in left.items())
            parts.append(f"<table><tr><th>left out because</th><th>images</th></tr>{rows}</table>")
        figures = {k: v for k, v in (rec.get("figures") or {}).items() if k not in ("rows", "left_out")}
        if figures:  # every number the card prints, a table per block (memorization, fidelity, utility, …)
            parts.append("<p>The card's figures:</p>")
            parts.append(stats_table({k: v for k, v in figures.items() if not isinstance(v, dict)}, "release"))
            parts += [stats_table(v, k) for k, v in figures.items() if isinstance(v, dict)]
        files = _file_names(rec.get("files"))
        if files:
            parts.append(f"<p>Files: {html.escape(', '.join(files))}.</p>")
    return "\n".join(parts)


PACKAGES = ("torch", "torchvision", "ray", "diffusers", "transformers", "open_clip_torch", "faiss-cpu", "numpy",
            "scipy", "scikit-learn", "pydicom", "openslide-python", "pyarrow")  # fmt: skip


PAPER_READERS = {  # DESIGN §2: the paper's reader studies, accuracy % and confidence (mean ± sd across 3 readers)
    "cholecystectomy-phase": {"real": (83.66, 3.00, 4.16, 0.59), "synthetic": (98.04, 0.00, 4.34, 0.62)},
    "oct-condition": {"real": (92.16, 3.40, 4.27, 0.76), "synthetic": (98.69, 1.13, 4.35, 0.92)},
}


def reader_section(cfg: RunConfig) -> str:
    """The blinded reader study: what was built, who is reading, and the paper's table once readers submit."""
    from medisyn.configtools import ConfigError
    from medisyn.reader import db
    from medisyn.reader.analysis import analyze, figure
    from medisyn.reader.study import reader_dir

    head = "<h2>Reader study</h2>"
    try:
        folder = reader_dir(cfg)
    except ConfigError as exc:
        return f"{head}<p class=todo>{html.escape(str(exc))}</p>"
    if not db.db_path(folder).is_file():
        return f"{head}<p class=todo>no study built yet (`medisyn reader build`).</p>"
    conn = db.connect(folder)
    try:
        studies = conn.execute(
            "SELECT s.name, s.question, "
            "(SELECT COUNT(*) FROM images i WHERE i.study = s.name AND i.origin = 'real') AS real, "
            "(SELECT COUNT(*) FROM images i WHERE i.study = s.name AND i.origin = 'synthetic') AS synthetic, "
            "(SELECT COUNT(*) FROM items t WHERE t.study = s.name) AS items, "
            "(SELECT COUNT(*) FROM readers r WHERE r.study = s.name) AS readers, "
            "(SELECT COUNT(*) FROM readers r WHERE r.study = s.name AND r.submitted_at IS NOT NULL) AS submitted "
            "FROM studies s ORDER BY s.name"
        ).fetchall()
    finally:
        conn.close()
    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['question'])}</td><td>{s['real']}</td>"
        f"<td>{s['synthetic']}</td><td>{s['items']}</td><td>{s['readers']}</td><td>{s['submitted']}</td></tr>"
        for s in studies
    )
    parts = [
        head,
        "<p>Readers classify real test images and synthetic images, blinded to origin, one at a time "
        "(<code>medisyn reader serve</code>); items include images shown twice for intra-reader agreement.</p>",
        "<table><tr><th>study</th><th>question</th><th>real</th><th>synthetic</th><th>items</th>"
        f"<th>readers</th><th>submitted</th></tr>{rows}</table>",
    ]
    if not any(s["submitted"] for s in studies):
        parts.append("<p class=todo>No reader has submitted yet: the accuracy table appears here once one has.</p>")
        return "\n".join(parts)
    results = analyze(folder, cfg.reader.bootstrap_resamples, cfg.seed)
    table = [
        "<table><tr><th>study</th><th>images</th><th>readers</th><th>accuracy (%)</th><th>confidence</th>"
        "<th>paper: accuracy (%)</th><th>paper: confidence</th></tr>"
    ]
    for name, r in results.items():
        if not r.get("readers"):
            continue
        for origin in ("real", "synthetic"):
            acc, conf = r["across_readers"][origin]["accuracy"], r["across_readers"][origin]["confidence"]
            paper = PAPER_READERS.get(name, {}).get(origin)
            table.append(
                f"<tr><td>{html.escape(name)}</td><td>{origin}</td><td>{r['readers']}</td>"
                f"<td>{100 * acc['mean']:.2f} ± {100 * acc['sd']:.2f}</td>"
                f"<td>{conf['mean']:.2f} ± {conf['sd']:.2f}</td>"
                + (
                    f"<td>{paper[0]:.2f} ± {paper[1]:.2f}</td><td>{paper[2]:.2f} ± {paper[3]:.2f}</td>"
                    if paper
                    else "<td>–</td><td>–</td>"
                )
                + "</tr>"
            )
    parts.append("".join(table) + "</table>")
    for name, r in results.items():
        if not r.get("readers"):
            continue
        d = r["real_minus_synthetic"]
        intra = r["intra_reader"].values()
        agree = f"{np.mean([v['agreement'] for v in intra]):.0%}" if intra else "–"
        parts.append(
            f"<p><b>{html.escape(name)}</b>: real − synthetic accuracy {100 * d['difference']:+.1f} points "
            f"(95% CI {100 * d['lo95']:+.1f} to {100 * d['hi95']:+.1f}, readers and cases resampled); "
            f"Fleiss' kappa between readers {r['fleiss_kappa']:.2f}; intra-reader agreement on repeated images "
            f"{agree}; {r['pending_readers']} readers still reading.</p>"
        )
        with tempfile.TemporaryDirectory() as tmp:  # analysis.figure writes a file; the page carries it
            figure(r, name, Path(tmp) / "figure.png")
            parts.append(embed((Path(tmp) / "figure.png").read_bytes(), f"reader accuracy, {name}"))
    return "\n".join(parts)


def git_commit() -> str:
    """The commit of the code that wrote the report (a checkout), with a mark when it has edits."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def provenance_section(cfg: RunConfig) -> str:
    """What made this run: the resolved config, the seeds, package versions and the git commit."""
    from importlib.metadata import PackageNotFoundError, version

    import yaml

    from medisyn.config import to_dict

    versions = []
    for name in ("medisyn", *PACKAGES):
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    seeds = {
        "seed (splits, samples, trials)": cfg.seed,
        "model.seed": cfg.model.seed,
        "phantoms.seed": cfg.phantoms.seed,
        "audit-utility seeds": f"{cfg.seed} … {cfg.seed + cfg.audit_utility.seeds - 1}",
    }
    return "\n".join(
        [
            "<h2>Provenance</h2>",
            f"<p>Code: git commit <code>{html.escape(git_commit())}</code>. Seeds: "
            + "; ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in seeds.items())
            + ".</p>",
            f"<p>Packages: {html.escape(', '.join(versions))}.</p>",
            "<details><summary>Resolved config</summary><pre>"
            + html.escape(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            + "</pre></details>",
        ]
    )


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MediSyn report: {run}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #eee}}.todo{{color:#888}}</style>
</head><body><h1>MediSyn run <code>{run}</code></h1>
<p>Config: <code>{config}</code>; model preset <code>{preset}</code>.</p>
{sections}
<h2>Still to come</h2><p class=todo>{todo}</p>
</body></html>"""


def run(cfg: RunConfig):
    todo = ", ".join(s.name for s in STAGES if not s.built) or "nothing"
    page = PAGE.format(
        run=html.escape(cfg.run_dir),
        config=html.escape(Path(cfg.config_path).name or "defaults"),
        preset=cfg.model.preset,
        todo=todo,
        sections=ingest_section(cfg)
        + training_section(cfg)
        + synthetic_section(cfg)
        + fidelity_section(cfg)
        + memorization_section(cfg)
        + utility_section(cfg)
        + release_section(cfg)
        + reader_section(cfg)
        + provenance_section(cfg),
    )
    out = cfg.run_path / "report.html"
    atomic_write_bytes(page.encode(), out)
    print(f"report: {out} ({len(page.encode()) / 1e6:.1f} MB, figures embedded)")
    return out

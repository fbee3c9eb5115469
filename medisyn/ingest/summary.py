"""The ingest summary: the shape of the paper's Extended Data Tables 1–2, plus what was dropped.

Reads only small columns (never the images): the corpus's from its index (one file, however
many shards), the rejects' from their shards (one per corpus shard), so it is cheap at any scale.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medisyn.records import CAPTION_SHARE_BINS, SPLITS, caption_share_bin, read_shards, shard_files


def _read(folder: Path, columns: list[str]) -> dict[str, list]:
    """Columns of every shard in ``folder`` as lists (empty lists when there is no shard)."""
    if not shard_files(folder):
        return {c: [] for c in columns}
    table = read_shards(folder, columns)
    return {c: table.column(c).to_pylist() for c in columns}


def caption_counts(captions: list[str], top: int = 10) -> dict:
    """Images per caption over the train split: duplicated captions drive copying (Somepalli et al. 2023),
    so the summary shows how many distinct captions there are, the ``top`` most repeated with their counts,
    and how many captions carry 1, 2-4, 5-16, 17-64 or 65+ images. Captions are description phrases only."""
    counts = Counter(captions)
    histogram = {name: 0 for _, _, name in CAPTION_SHARE_BINS}
    for n in counts.values():
        histogram[caption_share_bin(n)] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"split": "train", "distinct": len(counts), "top": [[c, n] for c, n in ranked], "histogram": histogram}


def _by_split(keys: list, splits: list[str]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for k, s in zip(keys, splits, strict=True):
        row = table.setdefault(k, {sp: 0 for sp in SPLITS} | {"total": 0})
        row[s] += 1
        row["total"] += 1
    return dict(sorted(table.items()))


def summarize(
    corpus: Path,
    rejects: Path,
    unit_counts: list[dict],
    files: int,
    left_out: dict[str, dict[str, int]] | None = None,
    skipped: dict[str, str] | None = None,
) -> dict:
    """``left_out``: catalog entry -> {rule: files, frames, slices or patches} its description leaves
    out on purpose (filters, caps, masks, unlabelled images, in-between tumour fractions); ``skipped``:
    catalog entry -> why it was not read (an absent folder with its access and download steps)."""
    left_out = {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for k, v in (left_out or {}).items() if v}
    c = _read(corpus, ["specialty", "image_type", "labels", "split", "source", "caption"])
    r = _read(rejects, ["stage", "reason"])
    dup_reasons = Counter(
        reason.split(" of ")[0] for stage, reason in zip(r["stage"], r["reason"], strict=True) if stage == "dedup"
    )
    reject_reasons = Counter(reason for stage, reason in zip(r["stage"], r["reason"], strict=True) if stage != "dedup")
    background = sum(u["background"] for u in unit_counts)
    total = {sp: 0 for sp in SPLITS} | {"total": 0}
    for s in c["split"]:
        total[s] += 1
        total["total"] += 1
    return {
        "pairs": total,
        "by_specialty": _by_split(c["specialty"], c["split"]),
        "by_image_type": _by_split(c["image_type"], c["split"]),
        "by_specialty_image_type": _by_split(
            [f"{sp} / {t}" for sp, t in zip(c["specialty"], c["image_type"], strict=True)], c["split"]
        ),
        "by_class": _by_split(
            [f"{t}: {' + '.join(labels)}" for t, labels in zip(c["image_type"], c["labels"], strict=True)], c["split"]
        ),
        "by_source": _by_split(c["source"], c["split"]),
        "captions": caption_counts([t for t, s in zip(c["caption"], c["split"], strict=True) if s == "train"]),
        "rejects": dict(reject_reasons.most_common()),
        "duplicates": dict(dup_reasons.most_common()),
        "background_patches": background,
        "left_out": dict(sorted(left_out.items())),
        "skipped": dict(sorted((skipped or {}).items())),
        "task_seconds": sum(u.get("seconds", 0.0) for u in unit_counts),  # CPU-task time spent reading units
        # every item accounted for: images (frames, patches) that reached the corpus, were
        # duplicates, were rejected, or were background; files listed but unreadable are rejects
        "accounting": {
            "files_listed": files,
            "corpus": total["total"],
            "duplicates": sum(dup_reasons.values()),
            "rejected": sum(reject_reasons.values()),
            "background": background,
            # files, frames and rows never listed, and slices and patches a reader's rule left out (mask, tumour
            # fraction between thresholds, per-slide cap), per entry in left_out
            "left_out": sum(n for reasons in left_out.values() for n in reasons.values()),
        },
    }


def format_table(summary: dict) -> str:
    lines = []

    def table(title: str, rows: dict[str, dict[str, int]]):
        lines.append(f"{title:44s} {'train':>8s} {'val':>8s} {'test':>8s} {'total':>8s}")
        for k, v in rows.items():
            lines.append(f"  {k[:42]:42s} {v['train']:8d} {v['val']:8d} {v['test']:8d} {v['total']:8d}")
        lines.append("")

    table("pairs by specialty", summary["by_specialty"] | {"total": summary["pairs"]})
    table("pairs by image type", summary["by_image_type"])
    table("pairs by class", summary["by_class"])
    captions = summary.get("captions")
    if captions:  # summaries before it have none
        hist = ", ".join(f"{k}: {n}" for k, n in captions["histogram"].items())
        lines.append(f"train images per caption: {captions['distinct']} distinct captions; captions by images ({hist})")
        lines += [f"  {n:8d}  {caption}" for caption, n in captions["top"]]
        lines.append("")
    lines.append(f"rejected: {sum(summary['rejects'].values())}")
    lines += [f"  {n:6d}  {reason}" for reason, n in summary["rejects"].items()]
    lines.append(f"duplicates removed: {sum(summary['duplicates'].values())}")
    lines += [f"  {n:6d}  {reason}" for reason, n in summary["duplicates"].items()]
    lines.append(f"background patches dropped: {summary['background_patches']}")
    left_out, skipped = summary.get("left_out", {}), summary.get("skipped", {})
    if left_out:
        lines.append(f"left out by the catalog's rules: {sum(n for v in left_out.values() for n in v.values())}")
        for entry, reasons in left_out.items():
            lines.append(f"  {entry}")
            lines += [f"    {n:8d}  {reason}" for reason, n in reasons.items()]
    if skipped:
        lines.append(f"sources skipped: {len(skipped)}")
        lines += [f"  {entry}: {why}" for entry, why in skipped.items()]
    return "\n".join(lines)


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"summary: {path}")

"""``medisyn sources check``: does each downloaded repository match its catalog description?

Before any Ray work, and fast on a real download: it lists files and reads label tables (as ingest's
listing does), opens only a seeded sample of a few files with the entry's reader, and never reads
every image. Per entry it says found or absent (with the access terms and download steps), whether
its reader needs issue #35, the table files and their headers, files found against the catalog's
expected counts, the sample, and the captions and corpus count the entry would give after filters
and caps, with what its rules leave out. A present entry that does not match (a header, a template
that resolves to nothing, a missing table, an unreadable sample, a path or label value the description
does not cover) fails the check, naming the entry and the cause. Output names files only by their
``source_ref``: no patient value is printed.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import PurePosixPath

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.ingest.catalog import Source, load_sources, matching, reading
from medisyn.ingest.config import IngestConfig
from medisyn.ingest.readers import Rejected, iter_wsi_patches, read_dicom, read_image
from medisyn.ingest.steps import list_entry
from medisyn.ingest.units import Item

CAPTIONS_SHOWN = 8  # distinct captions printed per entry (most common first); the rest are counted
# listing rejects that mean the download holds values or paths its description does not know (a renamed class
# folder, a new label value): the description does not match, unlike data faults (a row without its file)
UNDESCRIBED = (
    "does not match files.regex",
    "not in classes",
    "none of label.values",
    "no caption phrase in classes",
    "not in split.map",
    "not in caption_fields.",
)


class Mismatch(Exception):
    """A present entry that does not match its description; the message names the cause."""


def _expected(entry, key: str) -> int:
    value = entry.expected.get(key, 0) if isinstance(entry.expected, dict) else getattr(entry.expected, key, 0)
    return int(value or 0)


def open_sample(item: Item, kind: str, cfg: IngestConfig, intensity: str) -> None:
    """Open one file as ingest would, cheaply: a DICOM's first frame, an image, a slide's first patch.
    A reader's reject raises :class:`Mismatch` with its reason (a fixed phrase, never a header value)."""
    pct, window = (cfg.percentile_low, cfg.percentile_high), (cfg.ct_window_width, cfg.ct_window_level)
    try:
        with storage.local_file(item.path, PurePosixPath(item.path).suffix) as local:
            if kind == "dicom":
                read_dicom(
                    local, frames="first", intensity=intensity, window=window, pct=pct, max_pixels=cfg.max_pixels
                )
            elif kind == "image":
                read_image(local, intensity=intensity, pct=pct, max_pixels=cfg.max_pixels)
            else:
                next(iter_wsi_patches(local, level=cfg.wsi_level, patch=cfg.wsi_patch_size), None)
    except Rejected as exc:
        raise Mismatch(f"sample file {item.ref} does not open with the {kind} reader ({exc.reason})") from None
    except OSError as exc:  # fetching or reading it failed: its message would carry the path, so only the type
        raise Mismatch(f"sample file {item.ref} could not be read ({type(exc).__name__})") from None


def _tables(source: Source) -> list[str]:
    """One line per table glob: the file it resolves to; none or several is a mismatch."""
    lines = []
    for pattern in source.entry.table_files:
        found = matching(source.root, pattern)
        if len(found) != 1:
            what = "matches no file" if not found else f"matches {len(found)} files (it must match exactly one)"
            raise Mismatch(f"table {pattern!r} {what}")
        lines.append(found[0] if found[0] == pattern else f"{pattern} -> {found[0]}")
    return lines


def check_entry(source: Source, cfg: IngestConfig, sample: int = 3, seed: int = 0) -> tuple[bool, list[str]]:
    """(matches, lines to print) for one catalog entry. Absent or needing #35 is not a failure."""
    entry, name = source.entry, source.entry.name
    if not source.present:
        return True, [f"{name}: {source.skipped}"]
    if source.skipped:
        return True, [f"{name}: found; {source.skipped}"]
    lines = [f"{name}: found at {storage.uri(source.root)}"]
    try:
        tables = _tables(source)
        try:
            listing = list_entry(entry, source.root, cfg)
        except ConfigError as exc:
            raise Mismatch(str(exc).removeprefix(f"source {name!r}: ")) from None
        if tables:
            lines.append(f"  tables (header as described): {', '.join(tables)}")
        # the glob's files after excludes: every ref of the source map but those of table rows without a file
        files = len(listing.source_map) - sum(r["reason"].endswith("but no such file") for r in listing.rejects)
        expected = _expected(entry, "files")
        gap = f" of {expected:,} expected" if expected else ""
        warn = "  WARNING: " if expected and files != expected else "  "
        lines.append(f"{warn}files: {files:,}{gap} matched by files.glob after its excludes")
        if not listing.items:
            raise Mismatch("no file becomes a pair (every file was rejected or left out)")
        undescribed = Counter(r["reason"] for r in listing.rejects if any(u in r["reason"] for u in UNDESCRIBED))
        if undescribed:
            why, n = undescribed.most_common(1)[0]
            raise Mismatch(f"{n:,} file(s) rejected because the description does not cover them: {why}")
        kind = reading(entry)
        picks = random.Random(seed).sample(
            sorted(listing.items, key=lambda it: it.ref), min(sample, len(listing.items))
        )
        for item in picks:
            open_sample(item, kind.kind, cfg, kind.intensity)
        lines.append(f"  sample: {len(picks)} file(s) opened with the {kind.kind} reader (seed {seed})")
        corpus = _expected(entry, "corpus")
        lines.append(f"  corpus: {len(listing.items):,} files" + (f" of {corpus:,} expected" if corpus else ""))
        captions = Counter(item.caption for item in listing.items).most_common()
        lines += [f"    {n:8,d}  {caption}" for caption, n in captions[:CAPTIONS_SHOWN]]
        if len(captions) > CAPTIONS_SHOWN:
            lines.append(f"    ... and {len(captions) - CAPTIONS_SHOWN} more caption(s)")
        if listing.left_out:
            lines.append(f"  left out: {sum(listing.left_out.values()):,}")
            lines += [f"    {n:8,d}  {why}" for why, n in sorted(listing.left_out.items(), key=lambda kv: -kv[1])]
        if listing.rejects:
            reasons = Counter(r["reason"] for r in listing.rejects).most_common()
            lines.append(f"  rejected at listing: {len(listing.rejects):,}")
            lines += [f"    {n:8,d}  {why}" for why, n in reasons]
    except Mismatch as exc:
        lines.append(f"  FAILED: source {name!r}: {exc}")
        return False, lines
    return True, lines


def check(cfg: IngestConfig, resolve=str, sample: int = 3, seed: int = 0, out=print) -> int:
    """Check every entry of ``ingest.sources``; 0 when each present entry matches, else 1."""
    if not cfg.sources:
        raise ConfigError("sources check: ingest.sources is not set (a catalog, e.g. ingest.sources=paper)")
    sources = load_sources(cfg, resolve)
    failed = []
    for source in sources:
        ok, lines = check_entry(source, cfg, sample, seed)
        for line in lines:
            out(line)
        if not ok:
            failed.append(source.entry.name)
    read = [s for s in sources if s.present and not s.skipped]
    out(
        f"sources check: {len(sources)} entries: {len(read) - len(failed)} match, {len(failed)} do not"
        + (f" ({', '.join(failed)})" if failed else "")
        + f", {sum(not s.present for s in sources)} absent, {sum(s.present and bool(s.skipped) for s in sources)} "
        "present but not read yet (issue #35)"
    )
    return 1 if failed else 0

"""``medisyn sources check``: does each downloaded repository match its catalog description?

Before any Ray work, and fast on a real download: it lists files and reads label tables (as ingest's
listing does), opens only a seeded sample of a few files with the entry's reader, and never reads
every image. Per entry it says found or absent (with the access terms and download steps), whether
the table files and their headers, files found against the catalog's
expected counts, the sample, and the captions and corpus count the entry would give after filters
and caps, with what its rules leave out. A present entry that does not match (a header, a template
that resolves to nothing, a missing table, an unreadable sample, a path or label value the description
does not cover) fails the check, naming the entry and the cause. Output names files only by their
``source_ref``: no patient value is printed.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from pathlib import PurePosixPath

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.ingest.catalog import Reading, Source, load_sources, matching, reading
from medisyn.ingest.config import IngestConfig
from medisyn.ingest.readers import Rejected
from medisyn.ingest.steps import list_entry
from medisyn.ingest.units import Item
from medisyn.ingest.worker import SourceUnreadable

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


def open_sample(item: Item, reading: Reading, cfg: IngestConfig) -> None:
    """Open one element as ingest would, cheaply, with the entry's reader: a DICOM's first frame, an image,
    a video's sampled frame, an HDF5 row, a .mat file, a NIfTI's first kept slice, a slide's first (labelled)
    patch. A reader's reject raises :class:`Mismatch` with its reason (a fixed phrase, never a header value)."""
    from medisyn.ingest.pipeline import settings_for
    from medisyn.ingest.worker import _file_images

    s = settings_for(reading, cfg)
    if s.kind == "dicom":
        s = replace(s, frames="first")
    try:
        with storage.local_file(item.path, PurePosixPath(item.path).suffix) as local:
            for _, arr, _, _ in _file_images([item], s, local, Counter()):
                if isinstance(arr, Rejected) and item.index < 0:
                    raise arr
                if arr is not None:  # a frame past a video's end is a fault of the data, not the description
                    break
    except Rejected as exc:
        raise Mismatch(f"sample file {item.ref} does not open with the {s.kind} reader ({exc.reason})") from None
    except OSError as exc:  # fetching or reading it failed: its message would carry the path, so only the type
        raise Mismatch(f"sample file {item.ref} could not be read ({type(exc).__name__})") from None
    except SourceUnreadable:  # its mask or outlines
        raise Mismatch(f"sample {item.ref}: its mask or lesion outlines could not be read") from None


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
    """(matches, lines to print) for one catalog entry. Absent is not a failure."""
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
        # the glob's files after excludes (a video or an HDF5 file once, not per element)
        files = listing.files
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
            open_sample(item, kind, cfg)
        lines.append(f"  sample: {len(picks)} element(s) opened with the {kind.kind} reader (seed {seed})")
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
        + f", {sum(not s.present for s in sources)} absent"
    )
    return 1 if failed else 0

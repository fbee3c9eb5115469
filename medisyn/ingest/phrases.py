"""The class phrases the configured sources can give, before ingest (checked by :mod:`medisyn.phrases`).

Old-format repositories give their ``classes`` values; a catalog entry gives ``SourceEntry.phrases()``,
but only when it will be read: an entry whose folder is absent adds no image to the corpus, so a
class only it has would match nothing after ingest. Such phrases are returned as notes, so the
error says which entry would have given them.
"""

from __future__ import annotations

from medisyn.ingest.config import IngestConfig
from medisyn.phrases import Phrase


def source_phrases(cfg: IngestConfig, resolve=str) -> tuple[set[Phrase], dict[str, str]]:
    """``(phrases of the sources ingest will read, {phrase: why an unread entry's phrase is not there})``.
    Reads the repositories file and the catalog, and asks whether each entry's folder exists; no image."""
    from medisyn.ingest.catalog import load_inputs

    repos, sources = load_inputs(cfg, resolve)
    out = {(r.specialty, r.image_type, r.name, p) for r, _ in repos for p in r.classes.values()}
    notes: dict[str, str] = {}
    for s in sources:
        e = s.entry
        if s.skipped:
            for p in e.phrases():
                notes.setdefault(p, f"source {e.name!r} has it but is skipped: {s.skipped.split(';')[0]}")
        else:
            out |= {(e.specialty, e.image_type, e.name, p) for p in e.phrases()}
    return out, notes

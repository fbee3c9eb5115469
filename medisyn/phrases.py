"""One source of truth for class phrases: every class a stage selects by must be a phrase the data has.

Prompt sets, utility tasks and reader studies pick corpus rows (and synthetic images) by the
phrases in the ``labels`` column, compared as exact strings. A class that no row carries selects
nothing, silently: a task trains on an empty class, a class-matched prompt set drops its prompt.
So each stage checks its classes before any work, against the corpus's labels once a corpus
exists (read from the index, never the images) and, before ingest, against the phrases the
configured sources can produce (``medisyn.ingest.phrases``). A class must be a phrase of its own
specialty, image type and (when named) sources: "edema" of chest X-rays does not make a
dermatology class "edema" valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from medisyn.configtools import ConfigError
from medisyn.records import read_corpus

# (specialty, image_type, source, phrase): one phrase a source can give images of one specialty and type
Phrase = tuple[str, str, str, str]


@dataclass(frozen=True)
class ClassNeed:
    """One class a stage selects by, and where it comes from (for the error)."""

    phrase: str
    where: str  # "prompt set 'utility' prompts[3]", "utility task 'dermoscopy'", "reader study 'oct-condition'"
    specialty: str = ""  # "" = any
    image_type: str = ""  # "" = any
    sources: tuple[str, ...] = ()  # () = any

    def scope(self, p: Phrase) -> bool:
        """Whether phrase row ``p`` is of this class's specialty, image type and sources."""
        specialty, image_type, source, _ = p
        return (
            (not self.specialty or specialty == self.specialty)
            and (not self.image_type or image_type == self.image_type)
            and (not self.sources or source in self.sources)
        )

    def describe_scope(self) -> str:
        parts = [x for x in (self.specialty, self.image_type) if x]
        text = " ".join(parts) if parts else "any"
        return text + (f" from {', '.join(self.sources)}" if self.sources else "")


def corpus_phrases(corpus: str | Path) -> set[Phrase]:
    """Every distinct (specialty, image_type, source, label phrase) of a corpus, from its index (or, for an
    older corpus, the shards' metadata columns): no image is read, so 1M rows cost one column scan."""
    table = read_corpus(corpus, ["specialty", "image_type", "source", "labels"]).combine_chunks()
    if not table.num_rows:
        return set()
    labels = table.column("labels").chunk(0)  # one chunk after combine_chunks: parent indices are row numbers
    parents = pc.list_parent_indices(labels)
    flat = pa.table(
        {
            "specialty": pc.take(table.column("specialty"), parents),
            "image_type": pc.take(table.column("image_type"), parents),
            "source": pc.take(table.column("source"), parents),
            "phrase": pc.list_flatten(labels),
        }
    )
    distinct = flat.group_by(["specialty", "image_type", "source", "phrase"]).aggregate([])
    columns = [distinct.column(c).to_pylist() for c in ("specialty", "image_type", "source", "phrase")]
    return set(zip(*columns, strict=True))


def check_classes(
    needs: Iterable[ClassNeed], available: Iterable[Phrase], what: str, notes: Mapping[str, str] | None = None
) -> None:
    """Raise ConfigError naming the first class that matches no phrase of ``available`` in its scope
    (specialty, image type, sources), with the nearest phrases so a typo is obvious. ``what`` names
    where the phrases came from ("the corpus's labels", "the configured sources"); ``notes`` add why a
    phrase is missing (an unread catalog entry has it)."""
    available, notes = set(available), notes or {}
    for need in needs:
        in_scope = sorted({p[3] for p in available if need.scope(p)})
        if need.phrase in in_scope:
            continue
        where = f"{need.where}: class {need.phrase!r} matches no phrase of {what} for {need.describe_scope()}"
        if not in_scope:
            note = f"; {notes[need.phrase]}" if need.phrase in notes else ""
            raise ConfigError(f"{where}: there is no {need.describe_scope()} image at all{note}")
        near = difflib.get_close_matches(need.phrase, in_scope, n=3, cutoff=0.6)
        hint = (
            f"; did you mean {' or '.join(map(repr, near))}?" if near else f"; the phrases there: {_listed(in_scope)}"
        )
        elsewhere = sorted({f"{p[0]} {p[1]} ({p[2]})" for p in available if p[3] == need.phrase})
        if elsewhere:
            hint += f" ({need.phrase!r} is a phrase of {', '.join(elsewhere)} only)"
        if need.phrase in notes:
            hint += f" ({notes[need.phrase]})"
        raise ConfigError(where + hint)


def _listed(phrases: list[str], most: int = 12) -> str:
    shown = ", ".join(map(repr, phrases[:most]))
    return shown + (f" and {len(phrases) - most} more" if len(phrases) > most else "")

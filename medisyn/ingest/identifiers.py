"""Identifier-like text kept out of captions: refused when the catalog and repositories load, before Ray.

A caption is built only from description text: a template and the phrases of its phrase maps (a
catalog entry's ``label.classes``, ``caption_fields`` maps and ``lesions.negative``; a repository's
``template`` and ``classes``); a source value with no phrase is a reject. So checking that text when it
loads is enough to keep a date, a record number, an address or a de-identification placeholder out of
every caption, prompt and released set. Placeholders matter most: in chest X-ray reports they are the
tokens models memorise most (Dutt et al. 2025). Errors name the entry or repository and the field,
never the value (it may be the identifier).

The DICOM reader adds the one check that needs a file: a header's PatientName or ReferringPhysicianName
token (3 letters or more) in the item's caption makes the file a reject (:func:`caption_holds_name`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from medisyn.configtools import ConfigError

if TYPE_CHECKING:
    from medisyn.ingest.config import RepositoryConfig
    from medisyn.ingest.describe import SourceEntry

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?"
)
_YEAR = r"(?:1[89]|20)\d\d\b"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
# (what the error calls it, pattern); searched case-insensitively, first match named
RULES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("a date", r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"),  # ISO 2019-03-12, 2019/3/12
        ("a date", r"\b\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})\b"),  # d/m/y, m/d/y: 12/03/2019, 3.12.19
        # a month name with a year: 12 Mar 2019, March 12, 2019, Mar-2019
        ("a date", rf"\b(?:{_DAY}[\s\-/.,]+)?{_MONTH}[\s\-/.,]+(?:{_DAY}[\s\-/.,]+)?{_YEAR}"),
        ("a date", rf"\b{_YEAR}[\s\-/.,]+{_MONTH}"),  # 2019 March, 2019-Mar
        ("a run of 5 or more digits", r"\d{5,}"),  # record and accession numbers, compact dates
        ("an email address", r"[\w.+-]+@[\w-]+\.[\w.-]+"),
        ("a URL", r"\b(?:https?|ftp)://|\bwww\.\w"),
        ("a de-identification placeholder", r"\[\*\*|\*\*\]|x{4,}|_{3,}|\[(?:redacted|removed)\]"),  # MIMIC, IU
    )
)


def identifier_kind(text: str) -> str:
    """What identifier-like content ``text`` holds ("a date", ...), or "" when none."""
    for name, pattern in RULES:
        if pattern.search(text):
            return name
    return ""


def _template_text(template: str) -> str:
    """A template's literal text, each placeholder a space (so no digits join across one)."""
    try:
        return " ".join(literal for literal, _, _, _ in string.Formatter().parse(template))
    except ValueError:  # malformed: the template check names it
        return template


def _phrases(field: str, mapping: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(field and the phrase's position, phrase): the position, not the key or value, finds it in the file."""
    for n, phrase in enumerate(mapping.values(), 1):
        yield f"{field} (phrase {n} of {len(mapping)})", phrase


def entry_texts(entry: SourceEntry) -> Iterator[tuple[str, str]]:
    """Every text of a catalog entry that can reach a caption, with its field."""
    yield "caption", _template_text(entry.caption)
    yield from _phrases("label.classes", entry.label.classes)
    for name, cf in entry.caption_fields.items():
        yield from _phrases(f"caption_fields.{name}.map", cf.map)
    if entry.lesions is not None:
        yield "lesions.negative", entry.lesions.negative


def repository_texts(repo: RepositoryConfig) -> Iterator[tuple[str, str]]:
    """Every text of an old-format repository that can reach a caption, with its field."""
    yield "template", _template_text(repo.template)
    yield from _phrases("classes", repo.classes)


def check_texts(texts: Iterable[tuple[str, str]], where: str) -> None:
    """ConfigError naming ``where``, the field and the rule for the first text with identifier-like content."""
    for field, text in texts:
        kind = identifier_kind(text)
        if kind:
            raise ConfigError(
                f"{where}.{field}: holds {kind}, which must never reach a caption (the value is not repeated "
                "here; write a description phrase instead)"
            )


def check_entry(entry: SourceEntry, where: str) -> None:
    check_texts(entry_texts(entry), where)


def check_repository(repo: RepositoryConfig) -> None:
    check_texts(repository_texts(repo), f"repository {repo.name!r}")


NAME_FIELDS = ("PatientName", "ReferringPhysicianName")
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script)


def name_tokens(ds) -> set[str]:
    """Lower-cased tokens of 3 letters or more of a DICOM dataset's person-name fields."""
    out: set[str] = set()
    for key in NAME_FIELDS:
        value = ds.get(key)
        if value is not None:
            out |= {w.lower() for w in _WORD.findall(str(value)) if len(w) >= 3}
    return out


def caption_holds_name(ds, caption: str) -> bool:
    """Whether a word of ``caption`` is a token of the file's PatientName or ReferringPhysicianName."""
    return bool(name_tokens(ds) & {w.lower() for w in _WORD.findall(caption)})

"""Prompt sets: named lists of (prompt, count) in YAML or CSV, checked before any image is made.

``jobs/configs/prompts/<name>.yaml`` holds the paper's sets; a user's set is any YAML file
of the same shape or a CSV with columns ``prompt,count[,specialty,image_type,labels]``. The
``fid`` set is built from the captions of sampled real train images. Every image of a set
gets an id and a seed that are a pure function of (set name, prompt, index), so a resumed
or re-sharded job makes the same images and never duplicates or skips one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from medisyn.configtools import ConfigError, named_file
from medisyn.phrases import ClassNeed
from medisyn.records import IMAGE_TYPES, SPECIALTIES

PROMPT_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "prompts"
ENTRY_KEYS = ("prompt", "count", "specialty", "image_type", "labels", "task")
SET_KEYS = ("name", "prompts", "match_corpus", "description")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a folder name: no path, no dot


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    count: int
    specialty: str = ""
    image_type: str = ""
    labels: tuple[str, ...] = ()
    task: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str
    entries: tuple[PromptEntry, ...]
    match_corpus: bool = False
    source: str = ""

    @property
    def total(self) -> int:
        return sum(e.count for e in self.entries)


@dataclass(frozen=True)
class ImageJob:
    """One image to make: everything the generator and the manifest need."""

    id: str
    seed: int
    prompt: str
    index: int
    specialty: str
    image_type: str
    labels: tuple[str, ...] = field(default_factory=tuple)


def image_identity(set_name: str, prompt: str, index: int) -> tuple[str, int]:
    """(id, seed): a pure function of the set, the prompt and the image's index under it."""
    h = hashlib.sha256("\x00".join((set_name, prompt, str(index))).encode()).hexdigest()
    return h[:20], int(h[20:28], 16)


def _reject_unknown(data: dict, valid: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")


def _entry(raw, where: str) -> PromptEntry:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with prompt and count, got {raw!r}")
    _reject_unknown(raw, ENTRY_KEYS, where)
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: empty prompt")
    count = raw.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ConfigError(f"{where} ({prompt!r}): count must be a positive integer, got {count!r}")
    specialty, image_type = str(raw.get("specialty") or ""), str(raw.get("image_type") or "")
    if specialty and specialty not in SPECIALTIES:
        raise ConfigError(
            f"{where} ({prompt!r}): unknown specialty {specialty!r}; expected one of {', '.join(SPECIALTIES)}"
        )
    if image_type and image_type not in IMAGE_TYPES:
        raise ConfigError(
            f"{where} ({prompt!r}): unknown image_type {image_type!r}; expected one of {', '.join(IMAGE_TYPES)}"
        )
    labels = raw.get("labels") or ()
    if isinstance(labels, str):
        labels = [x.strip() for x in labels.split(";") if x.strip()]
    return PromptEntry(
        prompt.strip(), count, specialty, image_type, tuple(str(x) for x in labels), str(raw.get("task") or "")
    )


def load_prompt_set(name_or_path: str) -> PromptSet:
    """A set by name (``jobs/configs/prompts/<name>.yaml``) or by path (YAML or CSV)."""
    path = named_file(name_or_path, PROMPT_DIR, f"prompt set {name_or_path!r}", also="fid")
    if path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "prompt" not in table.columns or "count" not in table.columns:
            raise ConfigError(
                f"{path}: a prompt CSV needs the columns prompt and count; it has {', '.join(table.columns)}"
            )
        rows = []
        for i, row in enumerate(table.to_dict("records")):
            try:
                row["count"] = int(row["count"])
            except ValueError:
                raise ConfigError(
                    f"{path} row {i + 2} ({row['prompt']!r}): count {row['count']!r} is not an integer"
                ) from None
            rows.append({k: v for k, v in row.items() if v != "" or k == "prompt"})
        data = {"name": path.stem, "prompts": rows}
    else:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with name and prompts")
    _reject_unknown(data, SET_KEYS, str(path))
    entries = data.get("prompts")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: prompts must be a non-empty list")
    parsed = tuple(_entry(e, f"{path.name}: prompts[{i}]") for i, e in enumerate(entries))
    seen = set()
    for i, e in enumerate(parsed):
        if e.prompt in seen:
            raise ConfigError(
                f"{path.name}: prompts[{i}] repeats the prompt {e.prompt!r}; give it one entry with the total count"
            )
        seen.add(e.prompt)
    name = str(data.get("name") or path.stem)
    if not SET_NAME.fullmatch(name):
        raise ConfigError(
            f"{path}: set name {name!r} must be 1-64 letters, digits, '-' or '_', starting with a letter or digit "
            "(it names the set's folder under synthetic/)"
        )
    return PromptSet(name, parsed, bool(data.get("match_corpus", False)), str(path))


def class_needs(pset: PromptSet) -> list[ClassNeed]:
    """Each entry's labels as classes to check against the corpus's phrases (:mod:`medisyn.phrases`): the
    audits select its images by them, and ``match_to_corpus`` would silently drop a prompt no row matches."""
    return [
        ClassNeed(label, f"prompt set {pset.name!r} prompts[{i}]", e.specialty, e.image_type)
        for i, e in enumerate(pset.entries)
        for label in e.labels
    ]


def _template(group: list[PromptEntry]) -> tuple[str, str] | None:
    """(text before, text after) the label shared by a task's one-label prompts, or None."""
    parts = set()
    for e in group:
        if len(e.labels) != 1 or e.prompt.count(e.labels[0]) != 1:
            return None
        at = e.prompt.index(e.labels[0])
        parts.add((e.prompt[:at], e.prompt[at + len(e.labels[0]) :]))
    return parts.pop() if len(parts) == 1 else None


def _multi_finding_entries(group: list[PromptEntry], captions) -> list[PromptEntry]:
    """The corpus's multi-finding captions of a task's template ("… showing a, b and c.", as ingest
    joins phrases) that name at least one of its labels, as prompts carrying their phrases as labels."""
    template = _template(group)
    if template is None:
        return []
    before, after = template
    classes, known = {e.labels[0] for e in group}, {e.prompt for e in group}
    out = []
    for caption in sorted(set(captions) - known):
        middle = caption[len(before) : len(caption) - len(after)]
        if not (caption.startswith(before) and caption.endswith(after) and middle):
            continue
        phrases = tuple(re.split(r", | and ", middle))
        if len(phrases) > 1 and all(phrases) and classes & set(phrases):
            e = group[0]
            out.append(PromptEntry(caption, 1, e.specialty, e.image_type, phrases, e.task))
    return out


def match_to_corpus(pset: PromptSet, train_captions: list[str]) -> PromptSet:
    """Rescale each task's counts to the class frequencies of the real train images.

    A prompt's weight is the number of train images with exactly that caption; each task keeps
    its total. Multi-label corpora (a chest X-ray shows several findings) add their multi-finding
    captions of the task's template as prompts, weighted the same way, so the set reproduces the
    corpus's label combinations, not single findings only. A task with no matching images keeps
    its counts."""
    from collections import Counter

    freq = Counter(train_captions)
    out = []
    for task in dict.fromkeys(e.task for e in pset.entries):
        group = [e for e in pset.entries if e.task == task]
        total = sum(e.count for e in group)
        group += _multi_finding_entries(group, freq)
        weights = [freq.get(e.prompt, 0) for e in group]
        if sum(weights) == 0:  # then no multi-finding caption was added either
            out += group
            continue
        raw = [total * w / sum(weights) for w in weights]
        counts = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
            counts[i] += 1  # largest remainders: the task total stays exact
        out += [
            PromptEntry(e.prompt, c, e.specialty, e.image_type, e.labels, e.task)
            for e, c in zip(group, counts, strict=True)
            if c > 0
        ]
    return PromptSet(pset.name, tuple(out), pset.match_corpus, pset.source)


def cap_counts(pset: PromptSet, max_per_prompt: int) -> PromptSet:
    """At most ``max_per_prompt`` images per prompt (0 = as written): the demo's small sets."""
    if max_per_prompt <= 0:
        return pset
    entries = tuple(
        PromptEntry(e.prompt, min(e.count, max_per_prompt), e.specialty, e.image_type, e.labels, e.task)
        for e in pset.entries
    )
    return PromptSet(pset.name, entries, pset.match_corpus, pset.source)


def expand(pset: PromptSet) -> list[ImageJob]:
    """Every image of the set, in a fixed order."""
    jobs = []
    for e in pset.entries:
        for i in range(e.count):
            image_id, seed = image_identity(pset.name, e.prompt, i)
            jobs.append(ImageJob(image_id, seed, e.prompt, i, e.specialty, e.image_type, e.labels))
    return jobs

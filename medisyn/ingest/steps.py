"""A catalog entry's files and label tables turned into Items, in small steps (DESIGN §10).

``list_entry`` runs, in order: ``list_files`` -> ``read_tables`` -> ``join_tables`` -> ``match`` ->
``apply_filters`` -> ``label`` -> ``assign_groups`` -> ``cap`` -> ``split`` -> ``caption``. Every file the
glob lists, and every table row without a file, ends in exactly one of: an Item, a reject (with a
reason) or a left-out count under a named reason. Tables are matched to files by pandas merges on
rendered keys (no pairwise search), so a million rows list in seconds. Like listing.py, this runs on
the driver and is the only place raw ids and paths are seen: group ids are salted-hashed at once,
files are known by ``source_ref`` and reasons name rules and columns, never a cell value.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
from upath import UPath

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.ingest.config import IngestConfig
from medisyn.ingest.describe import SourceEntry, TableSpec, element_fields
from medisyn.ingest.listing import glob_files, join_phrases, read_csv_table, source_ref
from medisyn.ingest.readers import Rejected, io_error
from medisyn.ingest.split import patient_hash, split_for
from medisyn.ingest.units import Item

OK, REJECT, LEAVE = "ok", "reject", "leave_out"


@dataclass
class Listing:
    """One entry's listing: what to read, what was rejected and what was left out on purpose."""

    items: list[Item] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)  # {"source_ref", "stage": "listing", "reason"}
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> files
    source_map: dict[str, str] = field(default_factory=dict)  # ref -> relative path (private)
    files: int = 0  # files the glob matched after its excludes (a video is one, whatever its frames)

    def reject(self, ref: str, reason: str) -> None:
        self.rejects.append({"source_ref": ref, "stage": "listing", "reason": reason})

    def leave_out(self, reason: str, n: int = 1) -> None:
        if n:
            self.left_out[reason] = self.left_out.get(reason, 0) + n


def _where(entry: SourceEntry) -> str:
    return f"source {entry.name!r}"


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex on the whole relative path: ``**/`` any folders (or none), ``*`` and ``?``
    within one path segment."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def render(template: str, frame: pd.DataFrame, where: str) -> pd.Series:
    """A template filled in for every row of ``frame`` at once (string concatenation of columns),
    normalised as a relative POSIX path would be (trimmed, ``\\`` -> ``/``, no leading ``./``)."""
    out = pd.Series([""] * len(frame), index=frame.index, dtype=object)
    for literal, name, _, _ in string.Formatter().parse(template):
        out = out + literal
        if name is not None:
            if name not in frame.columns:
                raise ConfigError(f"{where} {template!r}: no field {name!r} here")
            out = out + frame[name].astype(str)
    return out.str.strip().str.replace("\\", "/", regex=False).str.removeprefix("./")


def _values(series: pd.Series) -> list:
    """A column as a Python list (fast for pyarrow-backed strings too)."""
    return series.to_numpy(dtype=object).tolist()


def _isin(series: pd.Series, other: pd.Series) -> pd.Series:
    """``series.isin(other)`` through a Python set: pyarrow's isin converts a long value list one by one."""
    known = set(_values(other))
    return pd.Series([v in known for v in _values(series)], index=series.index, dtype=bool)


def _file_fields(rel: str, rx: re.Pattern | None) -> dict[str, str] | None:
    parent, _, name = rel.rpartition("/")
    stem = name[: name.rindex(".")] if name.rfind(".") > 0 else name  # as PurePosixPath.stem
    fields = {"path": rel, "name": name, "stem": stem, "parent": parent or "."}
    if rx is None:
        return fields
    m = rx.search(rel)
    return None if m is None else {**fields, **{k: v or "" for k, v in m.groupdict().items()}}


def list_files(entry: SourceEntry, root: UPath, cfg: IngestConfig, out: Listing) -> pd.DataFrame:
    """The files ``files.glob`` matches: excluded ones left out by reason, unreadable names, links
    leaving the root and paths ``files.regex`` does not match rejected; the rest with their fields."""
    found = glob_files(root, entry.files.glob)
    if not found:
        raise ConfigError(f"{_where(entry)}: files.glob {entry.files.glob!r} matches no file")
    excludes = [(reason, glob_regex(p)) for reason, p in entry.files.exclude.items()]
    rx = re.compile(entry.files.regex) if entry.files.regex else None
    records = []
    for rel, path, inside in found:
        reason = next((r for r, g in excludes if g.match(rel)), None)
        if reason is not None:
            out.leave_out(reason)
            continue
        ref = source_ref(entry.name, rel, cfg.split_salt)
        out.source_map[ref] = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            out.reject(ref, "file name is not valid UTF-8")
            continue
        if not inside:
            out.reject(ref, "outside the repository root (a symbolic link that leaves it)")
            continue
        fields = _file_fields(rel, rx)
        if fields is None:
            out.reject(ref, "path does not match files.regex")
            continue
        records.append({"__rel": rel, "__open": path, "__ref": ref, **fields})
    out.files = len(out.source_map)
    if not out.source_map:  # e.g. only __MACOSX/ left of a moved folder: a present entry would give nothing
        raise ConfigError(
            f"{_where(entry)}: files.glob {entry.files.glob!r} matches only files its files.exclude leaves out"
        )
    columns = ["__rel", "__open", "__ref", "path", "name", "stem", "parent", *(rx.groupindex if rx else ())]
    files = pd.DataFrame(records, columns=columns, dtype=object)
    files = files.assign(__file=files["__rel"], __index=-1, __annotation="")
    files = elements(entry, root, files, cfg, out)
    files["__key"] = render(entry.files.key, files, f"{_where(entry)}: files.key")
    return files


def _fill(template: str, row: dict) -> str:
    return template.format(**{k: v for k, v in row.items() if not k.startswith("__")}).strip().replace("\\", "/")


def _open_path(root: UPath, rel: str) -> str:
    """What a worker opens for ``rel`` under ``root`` (as glob_files gives it)."""
    return str(Path(root.path) / rel) if not storage.is_remote(root) else storage.uri(root / rel)


def _annotation_table(entry: SourceEntry, path: UPath, where: str) -> pd.DataFrame:
    """A video's annotation table as strings, its header checked as a label table's is."""
    v = entry.video
    df = read_csv_table(path, f"{where} ({path.name})", v.encoding, v.delimiter, v.header)
    if not v.header:
        if len(df.columns) < len(v.columns):
            raise ConfigError(f"{where} ({path.name}) has {len(df.columns)} columns, columns names {len(v.columns)}")
        return df.set_axis(list(v.columns) + [f"__extra{i}" for i in range(len(df.columns) - len(v.columns))], axis=1)
    missing = [c for c in v.columns if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{where} ({path.name}) has no column(s) {', '.join(map(repr, missing))} among its "
            f"{len(df.columns)} columns (a header row that differs, or set header: false)"
        )
    return df


def _video_elements(entry: SourceEntry, root: UPath, rec: dict, cfg: IngestConfig, out: Listing) -> list[dict]:
    """One element per annotated frame with ``frame % every == 0``; the others are left out by count."""
    v, where = entry.video, f"{_where(entry)}: video.annotations"
    path = root / _fill(v.annotations, rec)
    if not path.is_file():
        out.reject(rec["__ref"], "no annotation file for this video (video.annotations)")
        return []
    df = _annotation_table(entry, path, where)
    frames = pd.to_numeric(df[v.frame].astype(str).str.strip(), errors="coerce")
    if frames.isna().any() or (frames < 0).any() or (frames % 1 != 0).any():
        out.reject(rec["__ref"], f"annotation column {v.frame!r} holds a value that is not a frame number")
        return []
    df = df.assign(__frame=frames.astype("int64")).drop_duplicates("__frame")
    kept = df[df["__frame"] % v.every == 0]
    out.leave_out(f"video.every: annotated frame between samples (every {v.every})", len(df) - len(kept))
    rel, cols = rec["__rel"], list(v.columns)
    rows = []
    for values in zip(*(_values(kept[c].astype(str)) for c in cols), _values(kept["__frame"]), strict=True):
        frame = int(values[-1])
        ref = source_ref(entry.name, f"{rel}#{frame}", cfg.split_salt)
        out.source_map[ref] = f"{rel}#{frame}"
        element = {"__rel": f"{rel}#{frame}", "__ref": ref, "__index": frame, "index": str(frame)}
        rows.append({**rec, **dict(zip(cols, values[:-1], strict=True)), **element})
    return rows


def _rows_count(entry: SourceEntry, root: UPath, rec: dict) -> int:
    """An HDF5 file's rows (listing: the dataset's shape only; a remote file through a file object)."""
    from medisyn.ingest.arrays import hdf5_rows

    if not storage.is_remote(root):
        return hdf5_rows(rec["__open"], entry.hdf5.dataset)
    import h5py

    try:
        with (root / rec["__rel"]).open("rb") as f, h5py.File(f, "r") as h:
            return int(h[entry.hdf5.dataset].shape[0])
    except (KeyError, OSError, ValueError) as exc:
        if io_error(exc):
            raise
        raise Rejected(f"no dataset {entry.hdf5.dataset!r} in an HDF5 file") from None


def _hdf5_elements(entry: SourceEntry, root: UPath, rec: dict, cfg: IngestConfig, out: Listing) -> list[dict]:
    n = _rows_count(entry, root, rec)
    rel, rows = rec["__rel"], []
    for i in range(n):
        ref = source_ref(entry.name, f"{rel}#{i}", cfg.split_salt)
        out.source_map[ref] = f"{rel}#{i}"
        rows.append({**rec, "__rel": f"{rel}#{i}", "__ref": ref, "__index": i, "index": str(i)})
    return rows


def _mat_fields(entry: SourceEntry, root: UPath, rec: dict) -> dict[str, str]:
    """``mat.fields`` of one file, read without its image (a remote file is fetched: .mat files are small)."""
    from medisyn.ingest.arrays import mat_fields

    with storage.local_file(rec["__open"], PurePosixPath(rec["__rel"]).suffix) as local:
        return mat_fields(local, entry.mat.fields)


def elements(entry: SourceEntry, root: UPath, files: pd.DataFrame, cfg: IngestConfig, out: Listing) -> pd.DataFrame:
    """The reader's listing step: a video's sampled annotated frames and an HDF5 file's rows become one
    element row each (``__index``, the field ``index`` and the annotation's columns); a .mat file's
    ``mat.fields`` become its fields; a volume's mask and a slide's lesion XML are resolved. A file the
    reader cannot list (not MATLAB, no such dataset, no annotation file) is a reject with the reason."""
    mask = entry.volume.mask if entry.reader == "nifti" and entry.volume is not None else ""
    annotation = (entry.lesions.annotations or entry.lesions.masks) if entry.lesions is not None else mask
    if not (element_fields(entry) or annotation):
        return files.assign(__gone=False)
    records, extra = [], sorted(element_fields(entry))
    for rec in files.to_dict("records"):
        try:
            if entry.video is not None or entry.hdf5 is not None:
                found = (_video_elements if entry.video is not None else _hdf5_elements)(entry, root, rec, cfg, out)
                if found:  # its elements stand for it in the source map (each is an item, reject or count)
                    out.source_map.pop(rec["__ref"], None)
                records += found
            elif entry.mat is not None:
                records.append({**rec, **_mat_fields(entry, root, rec)})
            else:
                rel = _fill(annotation, rec)
                if mask and not (root / rel).is_file():
                    out.reject(rec["__ref"], "no mask file for this volume (volume.mask)")
                    continue
                records.append({**rec, "__annotation": _open_path(root, rel)})
        except Rejected as exc:
            out.reject(rec["__ref"], exc.reason)
        except Exception as exc:
            if io_error(exc) or isinstance(exc, ConfigError):
                raise
            out.reject(rec["__ref"], f"unreadable at listing ({type(exc).__name__})")
    columns = [*files.columns, *(c for c in extra if c not in files.columns)]
    listed = {r["__file"] for r in records}
    gone = files[~files["__file"].isin(listed)].assign(__gone=True)  # rejected here: its table row is no orphan
    kept = pd.DataFrame(records, columns=columns, dtype=object).assign(__gone=False)
    return pd.concat([kept, gone], ignore_index=True).fillna("")


def _one_file(root: UPath, pattern: str, where: str) -> UPath:
    found = glob_files(root, pattern)
    if len(found) != 1:
        names = ", ".join(rel for rel, _, _ in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(f"{where}.file {pattern!r} matches {len(found)} files{' (' + names + ')' if found else ''}")
    return root / found[0][0]


def read_table(t, root: UPath, where: str) -> tuple[pd.DataFrame, str]:
    """One table (or joined table) as strings, with its file name: named by ``columns`` when headerless,
    ``aliases`` renamed, its required columns checked (a missing one names the table, never a value)."""
    path = _one_file(root, t.file, where)
    df = read_csv_table(path, f"{where} ({path.name})", t.encoding, t.delimiter, t.header)
    if not t.header:
        if len(df.columns) < len(t.columns):
            raise ConfigError(f"{where} ({path.name}) has {len(df.columns)} columns, columns names {len(t.columns)}")
        names = list(t.columns) + [f"__extra{i}" for i in range(len(df.columns) - len(t.columns))]
        return df.set_axis(names, axis=1), path.name
    for column, spellings in t.aliases.items():
        other = next((s for s in spellings if s in df.columns), None)
        if column not in df.columns and other is not None:
            df = df.rename(columns={other: column})
    missing = [c for c in t.columns if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{where} ({path.name}) has no column(s) {', '.join(map(repr, missing))} among its "
            f"{len(df.columns)} columns (a header row that differs, or set header: false)"
        )
    return df, path.name


def _prepare(t: TableSpec, df: pd.DataFrame, i: int, name: str, where: str) -> pd.DataFrame:
    if t.regex is not None:
        rx = re.compile(t.regex.pattern)
        if rx.groupindex:
            found = df[t.regex.column].str.extract(rx, expand=True)
            df = df.assign(**{g: found[g].fillna("") for g in rx.groupindex})
    df = df.assign(**t.set, __table=i, __tname=name, __out="")
    return df.assign(__key=render(t.key, df, f"{where}.key"))


def read_tables(entry: SourceEntry, root: UPath) -> pd.DataFrame | None:
    """The entry's label tables, concatenated (their rows share one namespace); None without tables."""
    if not entry.tables:
        return None
    frames = []
    for i, t in enumerate(entry.tables):
        where = f"{_where(entry)}: tables[{i}]"
        df, name = read_table(t, root, where)
        frames.append(_prepare(t, df, i, name, where))
    return pd.concat(frames, ignore_index=True).fillna("")


def join_tables(entry: SourceEntry, root: UPath, rows: pd.DataFrame | None) -> pd.DataFrame | None:
    """Each ``join`` table merged onto the rows where its ``key`` equals the row's ``on`` (the first
    joined row per key); with ``how: inner`` a row without a match is marked to be left out."""
    for j, t in enumerate(entry.join):
        where = f"{_where(entry)}: join[{j}]"
        other, name = read_table(t, root, where)
        other = other.assign(__jkey=render(t.key, other, f"{where}.key")).drop_duplicates("__jkey")
        other = other[[c for c in other.columns if c not in rows.columns]]  # the main row's fields win
        rows = rows.assign(__jkey=render(t.on, rows, f"{where}.on"))
        rows = rows.merge(other, on="__jkey", how="left", indicator="__joined")
        if len(rows) and len(other) and not (rows["__joined"] == "both").any():
            raise ConfigError(f"{where}.key {t.key!r} meets no row's join[{j}].on {t.on!r} ({name})")
        if t.how == "inner":
            lost = (rows["__joined"] == "left_only") & (rows["__out"] == "")
            rows.loc[lost, "__out"] = f"no row in {name}"
        rows = rows.drop(columns=["__jkey", "__joined"]).fillna("")
    return rows


def match(
    entry: SourceEntry, files: pd.DataFrame, rows: pd.DataFrame | None, cfg: IngestConfig, out: Listing
) -> pd.DataFrame:
    """Files meet rows where ``files.key`` equals the table's ``key`` (one pair per file and row). A file
    without a row is rejected or left out (``unlisted``); a row without a file is a reject. A table none
    of whose rows meets a file is a ConfigError naming its key template."""
    gone = files["__key"][files["__gone"].astype(bool)]  # rejected by the reader at listing
    files = files[~files["__gone"].astype(bool)]
    if rows is None:
        return files.assign(__out="", __tname="")
    shadowed = [c for c in files.columns if c in rows.columns and c != "__key"]
    pairs = files.drop(columns=shadowed).merge(rows, on="__key", how="inner", sort=False)
    for i, t in enumerate(entry.tables):
        if (rows["__table"] == i).any() and not (pairs["__table"] == i).any():
            # no listed path is quoted: a source path can hold a patient number (CheXpert's patient64541/)
            raise ConfigError(
                f"{_where(entry)}: tables[{i}].key {t.key!r} matches no file's files.key {entry.files.key!r} "
                f"({len(files)} files listed; is a folder missing or renamed?)"
            )
    tables = " or ".join(dict.fromkeys(rows["__tname"]))
    unlisted = files[~_isin(files["__key"], rows["__key"])]
    for ref in _values(unlisted["__ref"]):
        if entry.unlisted == "reject":
            out.reject(ref, f"no row in {tables}")
    if entry.unlisted == "leave_out":
        out.leave_out(f"unlabelled (no row in {tables})", len(unlisted))
    orphans = rows[~_isin(rows["__key"], pd.concat([files["__key"], gone]))].drop_duplicates("__key")
    for key, tname in zip(_values(orphans["__key"]), _values(orphans["__tname"]), strict=True):
        ref = source_ref(entry.name, key, cfg.split_salt)
        out.source_map[ref] = key
        out.reject(ref, f"listed in {tname} but no such file")
    return pairs


def apply_filters(entry: SourceEntry, pairs: pd.DataFrame, out: Listing) -> pd.DataFrame:
    """Rows failing a filter (or an inner join) are dropped; a file all of whose rows are dropped is
    left out under the first row's reason (``filter: <reason>``)."""
    marks = pairs["__out"].astype(object)
    for f in entry.filters:
        value = pairs[f.field].astype(str).str.strip()
        if f.in_ is not None:
            keep = value.isin(f.in_)
        elif f.not_in is not None:
            keep = ~value.isin(f.not_in)
        else:
            keep = value.str.contains(f.regex, regex=True)
        marks = marks.where(keep | (marks != ""), f"filter: {f.reason}")
    pairs = pairs.assign(__out=marks)
    kept = (marks == "").groupby(pairs["__ref"], sort=False).transform("any")
    for reason, n in pairs.loc[~kept].drop_duplicates("__ref")["__out"].value_counts(sort=False).items():
        out.leave_out(reason, int(n))
    return pairs[marks == ""]


def _policy(policy: str, reject: str, leave: str) -> tuple[str, str]:
    return (REJECT, reject) if policy == "reject" else (LEAVE, leave)


def _list_values(raw: str) -> list[str] | None:
    if raw == "":
        return []
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        return None
    return [str(v).strip() for v in value]


def field_label(entry: SourceEntry, raw: str) -> tuple[str, object]:
    """Phrases of a single-valued (or list-literal) label field."""
    label = entry.label
    raw = raw.strip()
    values = _list_values(raw) if label.list else [raw]
    if values is None:
        return REJECT, f"label field {label.field!r} does not hold a list literal"
    phrases = []
    for v in values:
        if v not in label.classes:
            what = "missing label" if v == "" else "label"
            return _policy(
                label.unmapped, f"{what} in field {label.field!r} not in classes", f"unmapped label ({label.field})"
            )
        phrases.append(label.classes[v])
    return OK, tuple(phrases)


def columns_label(entry: SourceEntry, cells: tuple[str, ...]) -> tuple[str, object]:
    """Phrases of the positive finding columns (one-hot / multi-label), uncertain read by policy."""
    label, values = entry.label, entry.label.values
    phrases = []
    for column, raw in zip(label.columns, cells, strict=True):
        v = raw.strip()
        if v in values.uncertain:
            if label.uncertain == "leave_out":
                return LEAVE, "uncertain label"
            positive = label.uncertain == "positive"
        elif v in values.positive or v in values.negative:
            positive = v in values.positive
        else:
            return REJECT, f"label value in column {column!r} is none of label.values"
        if positive and column not in label.classes:
            return _policy(
                label.unmapped,
                f"finding column {column!r} has no caption phrase in classes",
                f"unmapped label ({column})",
            )
        if positive:
            phrases.append(label.classes[column])
    return OK, tuple(phrases)


def _combine(entry: SourceEntry, outcomes: list[tuple[str, object]], table: str, order) -> tuple[str, object]:
    """One file's rows into one label: the first reject, else the first leave-out, else the rows'
    phrases (agree: the same set, else a reject; union: united, in classes order)."""
    for status in (REJECT, LEAVE):
        hit = next((v for s, v in outcomes if s == status), None)
        if hit is not None:
            return status, hit
    labels = [v for _, v in outcomes]
    if entry.rows == "agree" and any(set(v) != set(labels[0]) for v in labels[1:]):
        return REJECT, f"conflicting labels: rows of {table or 'the tables'} for this file disagree"
    phrases = tuple(sorted({p for v in labels for p in v}, key=order))
    if not phrases:
        return _policy(entry.label.none, "no positive finding mapped to a caption phrase", "no mapped finding")
    return OK, phrases


def _kept_fields(entry: SourceEntry) -> list[str]:
    names = [entry.group.field] if entry.group else []
    names += [entry.split.field] if entry.split else []
    return list(dict.fromkeys(names + [cf.field for cf in entry.caption_fields.values()]))


def label(entry: SourceEntry, pairs: pd.DataFrame, out: Listing) -> list[dict]:
    """Each row's caption phrases, then one candidate per file (``rows: agree | union``) carrying only
    the fields later steps read (its rows must agree on those)."""
    if entry.label.field:
        outcomes = [field_label(entry, v) for v in _values(pairs[entry.label.field].astype(str))]
    else:
        cells = zip(*(_values(pairs[c].astype(str)) for c in entry.label.columns), strict=True)
        outcomes = [columns_label(entry, c) for c in cells]
    order = {p: i for i, p in enumerate(dict.fromkeys(entry.label.classes.values()))}.__getitem__
    by_file: dict[str, list[int]] = {}
    for i, ref in enumerate(_values(pairs["__ref"])):
        by_file.setdefault(ref, []).append(i)
    keep = {c: _values(pairs[c].astype(str)) for c in _kept_fields(entry)}
    rel, opened, tname = (_values(pairs[c]) for c in ("__rel", "__open", "__tname"))
    files, index, notes = (_values(pairs[c]) for c in ("__file", "__index", "__annotation"))
    cands = []
    for ref, idx in by_file.items():
        status, value = _combine(entry, [outcomes[i] for i in idx], tname[idx[0]], order)
        split_on = next((c for c, v in keep.items() if len({v[i] for i in idx}) > 1), None)
        if status == OK and split_on is not None:  # group, split or caption field: the file's rows must agree
            status, value = REJECT, f"conflicting rows: rows of {tname[idx[0]]} for this file disagree on {split_on!r}"
        if status == REJECT:
            out.reject(ref, value)
        elif status == LEAVE:
            out.leave_out(value)
        else:
            i = idx[0]
            fields = {c: v[i] for c, v in keep.items()}
            cands.append(
                {
                    **{"ref": ref, "rel": rel[i], "open": opened[i], "labels": value, "fields": fields},
                    **{"file": files[i], "index": int(index[i]), "annotation": notes[i]},
                }
            )
    return cands


def assign_groups(entry: SourceEntry, cands: list[dict], cfg: IngestConfig, out: Listing) -> list[dict]:
    """The group id (patient, study, lesion, ...) of each file, salted-hashed at once; an empty id is
    a reject or the file's own group (``group.blank``); without ``group`` each file is alone."""
    g = entry.group
    rx = re.compile(g.regex) if g is not None and g.regex else None
    kept = []
    for c in cands:
        gid = c["file"] if g is None else c["fields"][g.field].strip()  # a video's frames: the video
        if rx is not None and gid:
            m = rx.search(gid)
            gid = "" if m is None else (m.group(1) if rx.groups else m.group(0)) or ""
        if not gid:
            if g.blank == "reject":
                out.reject(c["ref"], f"missing {g.kind} id in field {g.field!r}")
                continue
            gid = c["file"]
        kept.append({**c, "group": patient_hash(gid, cfg.split_salt)})
    return kept


def rank(seed: int, entry: str, rel: str) -> str:
    """A file's place in cap order: a hash, so caps do not depend on listing order."""
    return hashlib.sha256(f"{seed}\x00{entry}\x00{rel}".encode("utf-8", "surrogateescape")).hexdigest()


def _keep_first(cands: list[dict], bucket, limit, reason: str, out: Listing) -> list[dict]:
    seen: Counter = Counter()
    kept = []
    for c in cands:
        b = bucket(c)
        seen[b] += 1
        n = limit(b)
        if n is None or seen[b] <= n:
            kept.append(c)
        else:
            out.leave_out(reason)
    return kept


def cap(entry: SourceEntry, cands: list[dict], out: Listing) -> list[dict]:
    """Seeded caps per group, per class (the ``{label}`` text; ``min``: the smallest class's size) and
    in total, keeping the files first in hash order; returned in path order."""
    caps = entry.caps
    cands = sorted(cands, key=lambda c: (rank(caps.seed, entry.name, c["rel"]), c["rel"]))
    if caps.per_group:
        cands = _keep_first(cands, lambda c: c["group"], lambda _: caps.per_group, "cap per_group", out)
    if caps.per_class:
        cls = lambda c: join_phrases(list(c["labels"]))  # noqa: E731
        if isinstance(caps.per_class, dict):
            limit = caps.per_class.get
        else:
            n = min(Counter(map(cls, cands)).values(), default=0) if caps.per_class == "min" else caps.per_class
            limit = lambda _: n  # noqa: E731
        cands = _keep_first(cands, cls, limit, "cap per_class", out)
    if caps.total and len(cands) > caps.total:
        out.leave_out("cap total", len(cands) - caps.total)
        cands = cands[: caps.total]
    return sorted(cands, key=lambda c: (c["file"], c["index"], c["rel"]))


def split(entry: SourceEntry, cands: list[dict], cfg: IngestConfig, out: Listing) -> list[dict]:
    """The official split through ``split.map`` (an unmapped value is a reject), else the group-level
    hash split: no group in two splits."""
    kept = []
    for c in cands:
        if entry.split is None:
            kept.append({**c, "split": split_for(c["group"], cfg.split_fractions)})
            continue
        value = entry.split.map.get(c["fields"][entry.split.field].strip())
        if value is None:
            out.reject(c["ref"], f"value in split field {entry.split.field!r} not in split.map")
        else:
            kept.append({**c, "split": value})
    return kept


def caption(entry: SourceEntry, cands: list[dict], cfg: IngestConfig, out: Listing) -> list[Item]:
    """Items captioned from the template: ``{label}`` the joined phrases, every other field a phrase
    from its ``caption_fields`` map (an unmapped value is a reject): only description text is written."""
    items = []
    for c in cands:
        phrases = {}
        for name, cf in entry.caption_fields.items():
            phrase = cf.map.get(c["fields"][cf.field].strip())
            if phrase is None:
                out.reject(c["ref"], f"value of field {cf.field!r} not in caption_fields.{name}.map")
                break
            phrases[name] = phrase
        else:
            text = entry.caption.format(label=join_phrases(list(c["labels"])), **phrases)
            if entry.video is not None:  # a video's frames: near duplicates are sought across videos only
                series = source_ref(entry.name, c["file"], cfg.split_salt)
            else:  # the folder
                series = source_ref(entry.name, c["rel"].rpartition("/")[0] or ".", cfg.split_salt)
            note, alternatives = c["annotation"], ()
            les = entry.lesions
            if les is not None and les.positive in c["labels"]:  # labelled patch by patch from its outlines
                if not note or not storage.path(note).is_file():
                    which = "annotations" if les.annotations else "masks"
                    out.reject(c["ref"], f"no lesion annotation file for this slide (lesions.{which})")
                    continue
                alternatives = tuple(
                    (cls, (phrase,), entry.caption.format(label=phrase, **phrases))
                    for cls, phrase in (("positive", les.positive), ("negative", les.negative))
                )
            elif les is not None:
                note = ""  # a slide without the positive phrase: every tissue patch keeps its caption
            items.append(
                Item(
                    *(c["ref"], c["open"], entry.name, c["group"], c["split"], c["labels"], text, series),
                    index=c["index"],
                    annotation=note,
                    alternatives=alternatives,
                )
            )
    return items


def list_entry(entry: SourceEntry, root: str | os.PathLike, cfg: IngestConfig) -> Listing:
    """Items, rejects, left-out counts and the private source map of one entry, from its folder
    (local or ``s3://``). A description that does not fit the files is a ConfigError naming the field."""
    root = storage.path(root)
    if not root.is_dir():
        raise ConfigError(f"{_where(entry)}: {storage.uri(root)!r} is not a folder")
    out = Listing()
    files = list_files(entry, root, cfg, out)
    rows = join_tables(entry, root, read_tables(entry, root))
    pairs = apply_filters(entry, match(entry, files, rows, cfg, out), out)
    cands = assign_groups(entry, label(entry, pairs, out), cfg, out)
    cands = split(entry, cap(entry, cands, out), cfg, out)
    out.items = caption(entry, cands, cfg, out)
    return out

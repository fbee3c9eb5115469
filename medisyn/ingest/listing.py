"""Listing: a repository's files joined with its label table, before any pixel is read.

Runs on the driver and is the only place that sees raw patient ids and source paths: ids
are salted-hashed here, and every file gets a privacy-safe reference (``repo/<hash>``) that
is all later stages, logs and the rejects table ever show. The mapping back to paths goes to
``private/source_map.parquet`` for the data steward, apart from the shareable corpus.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

import pandas as pd
from upath import UPath

from medisyn import storage
from medisyn.configtools import ConfigError, build, load_yaml_file
from medisyn.ingest.config import IngestConfig, RepositoryConfig
from medisyn.ingest.identifiers import check_repository
from medisyn.ingest.split import patient_hash, split_for
from medisyn.ingest.units import Item
from medisyn.records import SPLITS

PRESENT = {"1", "1.0", "true", "yes", "y"}
ABSENT = {"", "0", "0.0", "-1", "-1.0", "false", "no", "n", "nan"}  # -1: CheXpert's "uncertain", read as absent


def join_phrases(phrases: list[str]) -> str:
    """ "a", "a and b", "a, b and c" — how a multi-label caption reads naturally."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def source_ref(repo: str, relpath: str, salt: str) -> str:
    digest = hashlib.sha256("\x00".join((salt, repo, relpath)).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{repo}/{digest[:16]}"


def _root(path: str, folder: UPath | None) -> UPath:
    """A repository root: a URI (``s3://bucket/repo``) or an absolute path as given, a relative path
    against ``folder`` (the repositories file's, which may itself be a URI), else the working directory."""
    if "://" in path or os.path.isabs(path) or folder is None:
        return storage.path(path)
    return folder / path


def load_repositories(cfg: IngestConfig, resolve=str) -> tuple[tuple[RepositoryConfig, UPath], ...]:
    """Inline repositories plus those of ``repositories_file``, each with its root folder (local or a
    URI: :mod:`medisyn.storage`). ``resolve`` fills placeholders in the file's name (``{run_dir}``) and
    must keep a URI a URI."""
    out = [(r, _root(r.path, None)) for r in cfg.repositories]
    if cfg.repositories_file:
        f = storage.path(os.fspath(resolve(cfg.repositories_file)))
        if not f.is_file():
            raise ConfigError(f"ingest.repositories_file: {str(f)!r} not found")
        data = load_yaml_file(f, "ingest.repositories_file") or {}
        if not isinstance(data, dict) or not isinstance(data.get("repositories"), list):
            raise ConfigError(f"{f}: expected a mapping with a 'repositories' list")
        for i, entry in enumerate(data["repositories"] or []):
            repo = build(RepositoryConfig, entry, f"{f.name}: repositories[{i}]")
            out.append((repo, _root(repo.path, f.parent)))
    if not out:
        raise ConfigError("ingest: no repositories; set ingest.repositories or ingest.repositories_file")
    for repo, _ in out:
        check_repository(repo)  # no date, number or placeholder in what reaches a caption
    names = [r.name for r, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"ingest: repository names must be unique; repeated: {', '.join(dupes)}")
    return tuple(out)


def read_csv_table(
    csv: UPath, where: str, encoding: str = "utf-8", delimiter: str = ",", header: bool = True
) -> pd.DataFrame:
    """A CSV (local file or object) as strings, blanks kept as ""; quoted cells may hold newlines.
    ``header=False``: columns are numbered 0, 1, ... Problems name ``where``, never a cell value."""
    try:
        with csv.open("rb") as f:
            return pd.read_csv(
                f, dtype=str, keep_default_na=False, encoding=encoding, sep=delimiter, header=0 if header else None
            )
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not {encoding} text; set the repository's encoding (e.g. latin-1)") from None
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{where} is empty") from None
    except pd.errors.ParserError as exc:  # "Expected 3 fields in line 5, saw 4": positions, no cell values
        raise ConfigError(f"{where} is not a well-formed CSV ({str(exc).strip().splitlines()[-1]})") from None


def read_label_table(repo: RepositoryConfig, root: str | os.PathLike) -> pd.DataFrame:
    """The label CSV as strings, its required columns checked (a missing one names the file). Read
    through :mod:`medisyn.storage`: a local file or an object."""
    csv = storage.path(root) / repo.labels_csv
    if not csv.is_file():
        raise ConfigError(f"repository {repo.name!r}: labels_csv {str(csv)!r} not found")
    where = f"repository {repo.name!r}: labels_csv {csv.name}"
    table = read_csv_table(csv, where, repo.encoding)
    needed = [repo.path_column, repo.patient_column, *repo.label_columns] + (
        [repo.split_column] if repo.split_column else []
    )
    missing = [c for c in needed if c not in table.columns]
    if missing:
        # the names it does have are not repeated: in a table without a header row they are a patient's data
        raise ConfigError(
            f"{where} has no column(s) {', '.join(map(repr, missing))} among its {len(table.columns)} columns "
            "(does its first row name the columns?)"
        )
    return table


def _labels(repo: RepositoryConfig, row: dict) -> tuple[str, ...]:
    """Caption phrases of one label row, or ValueError with the reason (becomes a reject)."""
    if len(repo.label_columns) == 1:
        raw = row[repo.label_columns[0]].strip()
        if raw == "":
            raise ValueError(f"missing label in column {repo.label_columns[0]!r}")
        if raw not in repo.classes:
            # the value itself is not repeated: a misconfigured column could hold identifiers
            raise ValueError(
                f"label in column {repo.label_columns[0]!r} not in the classes of repository {repo.name!r}"
            )
        return (repo.classes[raw],)
    phrases = []
    for col in repo.label_columns:
        raw = row[col].strip().lower()
        if raw in PRESENT:
            if col not in repo.classes:
                raise ValueError(f"finding column {col!r} has no caption phrase in classes")
            phrases.append(repo.classes[col])
        elif raw not in ABSENT:
            raise ValueError(f"label value in column {col!r} is not 0/1")
    if not phrases:
        raise ValueError("no positive finding among the label columns")
    return tuple(phrases)


def _files(repo: RepositoryConfig, root: UPath) -> list[tuple[str, str, bool]]:
    """(relative POSIX path, what a worker opens, inside the root) of each file ``repo.glob`` matches,
    sorted. Local: the resolved path (a symbolic link that leaves the root is outside). An object store
    has no links: its URI, from one listing of the prefix (``fs.glob``), not a request per file."""
    return glob_files(root, repo.glob)


def glob_files(root: UPath, pattern: str) -> list[tuple[str, str, bool]]:
    """(relative POSIX path, what a worker opens, inside the root) of each file ``pattern`` matches
    under ``root``, sorted (see ``_files``)."""
    if not storage.is_remote(root):
        base = Path(root.path)
        inside = base.resolve()
        found = sorted((p.relative_to(base).as_posix(), p) for p in base.glob(pattern) if p.is_file())
        return [(rel, str(p.resolve()), p.resolve().is_relative_to(inside)) for rel, p in found]
    base = root.path.rstrip("/")
    root.fs.invalidate_cache(base)  # this process may have listed it before the bucket changed
    found = root.fs.glob(f"{base}/{pattern}", detail=True)
    rels = sorted(name[len(base) + 1 :] for name, info in found.items() if info.get("type") == "file")
    return [(rel, storage.uri(root / rel), True) for rel in rels]


def list_repository(
    repo: RepositoryConfig, root: str | os.PathLike, cfg: IngestConfig
) -> tuple[list[Item], list[dict], dict[str, str]]:
    """(items to read, listing rejects, {ref: relative path}) for one repository, a local folder or
    an object-store prefix (``s3://bucket/repo``).

    Each file pairs with the label row of its own path or of its nearest listed
    ancestor folder (label tables of DICOM series often list the series folder).
    """
    root = storage.path(root)
    if not root.is_dir():
        raise ConfigError(f"repository {repo.name!r}: path {str(root)!r} is not a folder")
    table = read_label_table(repo, root)
    rows: dict[str, dict] = {}
    conflicting: set[str] = set()  # one file, two label rows that disagree: neither is trusted
    fields = [repo.patient_column, *repo.label_columns] + ([repo.split_column] if repo.split_column else [])
    for row in table.to_dict("records"):
        key = str(PurePosixPath(row[repo.path_column].strip().replace("\\", "/")))
        if key in rows and any(rows[key][f].strip() != row[f].strip() for f in fields):
            conflicting.add(key)
        rows.setdefault(key, row)
    items, rejects, source_map, used = [], [], {}, set()
    for rel, path, inside in _files(repo, root):
        ref = source_ref(repo.name, rel, cfg.split_salt)
        source_map[ref] = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        key = next((k for k in [rel, *map(str, PurePosixPath(rel).parents)] if k in rows), None)
        used.add(key)  # its label row found its file, whatever becomes of the file
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            rejects.append({"source_ref": ref, "stage": "listing", "reason": "file name is not valid UTF-8"})
            continue
        if not inside:
            reason = "outside the repository root (a symbolic link that leaves it)"
            rejects.append({"source_ref": ref, "stage": "listing", "reason": reason})
            continue
        if key is None:
            rejects.append(
                {"source_ref": ref, "stage": "listing", "reason": f"no row in {repo.labels_csv} (missing label)"}
            )
            continue
        if key in conflicting:
            reason = f"conflicting labels: rows of {repo.labels_csv} for this file disagree"
            rejects.append({"source_ref": ref, "stage": "listing", "reason": reason})
            continue
        row = rows[key]
        patient = row[repo.patient_column].strip()
        if not patient:
            rejects.append(
                {
                    "source_ref": ref,
                    "stage": "listing",
                    "reason": f"missing patient id in column {repo.patient_column!r}",
                }
            )
            continue
        try:
            labels = _labels(repo, row)
        except ValueError as exc:
            rejects.append({"source_ref": ref, "stage": "listing", "reason": str(exc)})
            continue
        hashed = patient_hash(patient, cfg.split_salt)
        split = row[repo.split_column].strip() if repo.split_column else split_for(hashed, cfg.split_fractions)
        if split not in SPLITS:
            rejects.append(
                {
                    "source_ref": ref,
                    "stage": "listing",
                    "reason": f"value in split column {repo.split_column!r} is not train/val/test",
                }
            )
            continue
        items.append(
            Item(
                ref,
                path,
                repo.name,
                hashed,
                split,
                labels,
                repo.template.format(label=join_phrases(list(labels))),
                source_ref(repo.name, str(PurePosixPath(rel).parent), cfg.split_salt),
            )
        )
    for key in sorted(set(rows) - used):
        ref = source_ref(repo.name, key, cfg.split_salt)
        source_map[ref] = key
        rejects.append(
            {
                "source_ref": ref,
                "stage": "listing",
                "reason": f"listed in {repo.labels_csv} but no such file matches {repo.glob!r}",
            }
        )
    return items, rejects, source_map

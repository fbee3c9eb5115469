"""The source description language: how a public repository looks as its publisher ships it.

A catalog (``jobs/configs/sources/<name>.yaml``, a mapping ``{sources: [entry, ...]}``) holds one entry
per repository: its terms and download steps, and, as data rather than Python per dataset, how its
files meet its label tables, which rows are left out, how labels become caption phrases, and how
files are grouped, capped and split. This module only parses and checks entries (everything a user
could get wrong stops here, naming the entry and the field); :mod:`medisyn.ingest.steps` applies them.
DESIGN §10 ("Source descriptions") documents every field.

Fields a template, filter, label, group, split or caption field may name:
- of a file: ``path`` (relative POSIX path), ``name`` (file name), ``stem``, ``parent`` (folder) and the
  named groups of ``files.regex``;
- of a row: the table's ``columns`` (after ``aliases``), its ``set`` constants, the named groups of its
  ``regex``, and the ``columns`` of every ``join``. Where a file and its row share a name, the row wins.
Filters keep the rows whose field is ``in`` the list / ``not_in`` it / matches ``regex`` (``re.search``);
every other row is left out under ``filter: <reason>``.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import string
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from medisyn.configtools import ConfigError, build, load_yaml_file, named_file
from medisyn.ingest.identifiers import check_entry
from medisyn.records import IMAGE_TYPES, SPECIALTIES, SPLITS

SOURCES_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "sources"
READERS = ("dicom", "image", "wsi", "video", "mat", "hdf5", "nifti")
SPEC_OF = {"video": "video", "mat": "mat", "hdf5": "hdf5", "volume": "nifti", "wsi": "wsi", "lesions": "wsi"}
FILE_FIELDS = ("path", "name", "stem", "parent")  # built-in fields of every listed file


@dataclass(frozen=True)
class Expected:
    """Counts at full download (informational: ``sources check`` reports found vs expected)."""

    files: int = 0  # files the glob matches after excludes (0 = not stated)
    corpus: int = 0  # image-caption pairs after every rule (0 = not stated)


@dataclass(frozen=True)
class FilesSpec:
    glob: str  # relative to the entry folder (pathlib glob; ** ok)
    exclude: dict[str, str] = field(default_factory=dict)  # reason -> glob: matching files are left out
    regex: str = ""  # re.search on the relative path; named groups become fields; no match = reject
    key: str = "{path}"  # template over file fields: how a file meets its table row


@dataclass(frozen=True)
class RowRegex:
    column: str  # the column searched
    pattern: str  # named groups become row fields (blank where it does not match)


@dataclass(frozen=True)
class TableSpec:
    file: str  # relative glob; must match exactly one file
    key: str  # template over the row's fields: equals the file's files.key
    columns: tuple[str, ...] = ()  # required header names (extra columns allowed); header: false -> names in order
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> other accepted spellings
    header: bool = True
    delimiter: str = ","
    encoding: str = "utf-8"
    regex: RowRegex | None = None
    set: dict[str, str] = field(default_factory=dict)  # constant fields of every row of this table


@dataclass(frozen=True)
class JoinSpec:
    file: str  # relative glob; exactly one file
    key: str  # template over the joined table's row
    on: str  # template over the main row: rows meet where key == on (first joined row per key)
    columns: tuple[str, ...] = ()
    how: Literal["left", "inner"] = "left"  # inner: a main row without a match is left out
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    header: bool = True
    delimiter: str = ","
    encoding: str = "utf-8"


@dataclass(frozen=True)
class GroupSpec:
    field: str  # the id's field; hashed with the split salt at once, never stored raw
    kind: Literal["patient", "study", "lesion", "image", "video"] = "patient"
    regex: str = ""  # the id is the first group (or the whole match) of re.search on the field
    blank: Literal["reject", "file"] = "reject"  # empty id: reject, or the file is its own group


@dataclass(frozen=True)
class LabelValues:
    positive: tuple[str, ...] = ("1", "1.0")
    negative: tuple[str, ...] = ("0", "0.0", "")
    uncertain: tuple[str, ...] = ("-1", "-1.0")


@dataclass(frozen=True)
class LabelSpec:
    classes: dict[str, str]  # value (or column) -> caption phrase: the only phrases that reach a caption
    field: str = ""  # single-valued label
    columns: tuple[str, ...] = ()  # or one column per finding (one-hot / multi-label)
    values: LabelValues = LabelValues()  # how a finding column reads (columns only)
    uncertain: Literal["negative", "positive", "leave_out"] = "negative"
    list: bool = False  # the field holds a list literal "['Mass', 'Skin Retraction']"
    unmapped: Literal["reject", "leave_out"] = "reject"  # a value / positive column not in classes
    none: Literal["reject", "leave_out"] = "reject"  # no positive mapped finding


@dataclass(frozen=True)
class FilterSpec:
    field: str
    reason: str  # counted as left out under "filter: <reason>"
    in_: tuple[str, ...] | None = None  # YAML key `in`: keep rows whose value is listed
    not_in: tuple[str, ...] | None = None  # keep rows whose value is not listed
    regex: str = ""  # keep rows whose value matches (re.search)


@dataclass(frozen=True)
class SplitSpec:
    field: str  # official split from a field
    map: dict[str, str]  # source value -> train | val | test; an unmapped value is a reject


@dataclass(frozen=True)
class CapsSpec:
    seed: int = 0
    per_class: int | str | dict[str, int] = 0  # 0 = none; int; "min"; {label text: int}
    per_group: int = 0  # 0 = no cap
    total: int = 0  # 0 = no cap


@dataclass(frozen=True)
class CaptionField:
    field: str
    map: dict[str, str]  # value -> phrase; an unmapped value is a reject


@dataclass(frozen=True)
class VideoSpec:
    """A video's frames as elements: its annotation table (one row per annotated frame) says which."""

    annotations: str  # template over file fields: the video's annotation file, relative to the entry folder
    frame: str  # column holding the 0-based frame index (counted at `fps`)
    fps: float  # the rate the annotation counts frames at; a video at another rate is a reject
    columns: tuple[str, ...] = ()  # required header names (header: false -> names in order); per-frame fields
    every: int = 1  # keep annotated frames whose index % every == 0
    header: bool = True
    delimiter: str = "\t"
    encoding: str = "utf-8"


@dataclass(frozen=True)
class MatSpec:
    image: str  # dataset path of the image inside the file (cjdata/image)
    fields: dict[str, str] = field(default_factory=dict)  # field -> dataset path, read at listing (never the image)
    transpose: bool = True  # MATLAB is column-major: 2-D arrays are transposed


@dataclass(frozen=True)
class Hdf5Spec:
    dataset: str  # each row (first dimension) is one image; the element field `index` is the row


@dataclass(frozen=True)
class VolumeSpec:
    axis: int = 2  # slice axis after reorientation to RAS+ (0 sagittal, 1 coronal, 2 axial)
    every: int = 1  # every k-th slice
    keep: tuple[float, float] = (0.0, 1.0)  # the fraction of the axis slices are taken from
    mask: str = ""  # template over file fields: a mask volume; only slices where it has a voxel > 0
    channel: int = 0  # a 4-D file: which volume of its 4th axis (MSD Task01: 0 FLAIR, 1 T1w, 2 t1gd, 3 T2w)


@dataclass(frozen=True)
class WsiSpec:
    """Per-entry slide tiling; an unset value is the ingest.wsi_* default."""

    level: int | None = None
    patch_size: int | None = None
    overlap: float | None = None
    tissue_fraction: float | None = None
    magnification: float | None = None  # tile at the level of this magnification (40: 40x); 0/None: use level


@dataclass(frozen=True)
class LesionSpec:
    """Patches of a slide labelled ``positive`` captioned patch by patch from its lesion outlines (ASAP XML)
    or its tumour mask (a TIFF whose non-zero pixels are tumour); exactly one of the two."""

    positive: str  # a phrase of label.classes: slides with it need their XML or mask (missing: reject)
    negative: str  # the phrase of a patch with tumour fraction <= normal_max
    annotations: str = ""  # template over file fields: the slide's ASAP XML
    masks: str = ""  # template over file fields: the slide's tumour-mask TIFF (instead of annotations)
    tumour_min: float = 0.5  # tumour fraction >= this: positive
    normal_max: float = 0.0  # <= this: negative; in between: left out
    per_slide: int = 0  # seeded cap of patches per slide and class (caps.seed; 0 = none)


@dataclass(frozen=True)
class SourceEntry:
    """One repository as shipped (DESIGN §10, "Source descriptions")."""

    name: str  # its folder under ingest.sources_root
    specialty: str
    image_type: str
    reader: Literal["dicom", "image", "wsi", "video", "mat", "hdf5", "nifti"]
    files: FilesSpec
    label: LabelSpec
    caption: str  # template: {label} and the names of caption_fields
    repository: str = ""
    publisher: str = ""
    version: str = ""
    licence: str = ""
    access: Literal["open", "registration", "credentialed"] = "open"
    download: str = ""
    frames: Literal["all", "middle", "first"] = "all"
    intensity: Literal["auto", "ct_window", "percentile", "minmax", "none"] = "auto"
    expected: Expected = Expected()
    assumed: tuple[str, ...] = ()
    tables: tuple[TableSpec, ...] = ()
    join: tuple[JoinSpec, ...] = ()
    unlisted: Literal["reject", "leave_out"] = "reject"
    rows: Literal["agree", "union"] = "agree"
    group: GroupSpec | None = None  # absent: each file is its own group
    filters: tuple[FilterSpec, ...] = ()
    split: SplitSpec | None = None  # absent: the group-level hash split (ingest.split_fractions)
    caps: CapsSpec = CapsSpec()
    caption_fields: dict[str, CaptionField] = field(default_factory=dict)
    video: VideoSpec | None = None  # reader video: its annotation table
    mat: MatSpec | None = None  # reader mat: datasets inside the file
    hdf5: Hdf5Spec | None = None  # reader hdf5: the image dataset
    volume: VolumeSpec | None = None  # reader nifti: slicing (absent: every axial slice)
    wsi: WsiSpec | None = None  # reader wsi: tiling (absent: ingest.wsi_*)
    lesions: LesionSpec | None = None  # reader wsi: patches labelled from lesion outlines

    @property
    def table_files(self) -> tuple[str, ...]:
        """Globs of its label tables and joined tables (for probing before ingest)."""
        return tuple(t.file for t in self.tables) + tuple(j.file for j in self.join)

    def phrases(self) -> set[str]:
        """Every label phrase a caption of this entry can carry."""
        return set(self.label.classes.values()) | ({self.lesions.negative} if self.lesions else set())


def template_fields(template: str, where: str) -> list[str]:
    """The ``{name}`` fields of a template, in order; a malformed template, a format spec or a
    positional field is a ConfigError naming ``where``."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where} {template!r} is malformed ({exc})") from None
    names = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if not name or name.isdigit() or spec or conv or any(c in name for c in ".[]"):
            raise ConfigError(f"{where} {template!r}: write plain {{field}} placeholders (no positions or formats)")
        names.append(name)
    return names


def compile_regex(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where} {pattern!r} does not compile ({exc})") from None


def table_fields(t: TableSpec | JoinSpec) -> set[str]:
    """Fields a table's rows carry (its declared columns, constants and regex groups)."""
    out = set(t.columns)
    if isinstance(t, TableSpec):
        out |= set(t.set)
        if t.regex is not None:
            out |= set(re.compile(t.regex.pattern).groupindex)
    return out


def file_fields(entry: SourceEntry) -> set[str]:
    """Fields of a file's path (what the annotation, mask and lesion templates may name)."""
    return set(FILE_FIELDS) | (set(re.compile(entry.files.regex).groupindex) if entry.files.regex else set())


def element_fields(entry: SourceEntry) -> set[str]:
    """Fields the reader supplies at listing: a video frame's annotation columns and ``index``, an HDF5
    row's ``index``, a .mat file's ``mat.fields``."""
    if entry.video is not None:
        return {*entry.video.columns, "index"}
    if entry.hdf5 is not None:
        return {"index"}
    if entry.mat is not None:
        return set(entry.mat.fields)
    return set()


def all_fields(entry: SourceEntry) -> set[str]:
    out = file_fields(entry) | element_fields(entry)
    for t in (*entry.tables, *entry.join):
        out |= table_fields(t)
    return out


def _need(names, known: set[str], where: str, what: str = "field") -> None:
    missing = [n for n in ([names] if isinstance(names, str) else names) if n not in known]
    if missing:
        raise ConfigError(
            f"{where}: {what} {', '.join(map(repr, missing))} is not a field of this entry "
            f"(known: {', '.join(sorted(known))})"
        )


def _relative(value: str, where: str) -> None:
    p = PurePosixPath(value.replace("\\", "/"))
    if not value or p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"{where} {value!r} must be a relative glob inside the entry folder (no '..')")


def _check_table(t: TableSpec | JoinSpec, where: str) -> None:
    _relative(t.file, f"{where}.file")
    try:
        codecs.lookup(t.encoding)
    except LookupError:
        raise ConfigError(f"{where}.encoding: unknown encoding {t.encoding!r}") from None
    if len(t.delimiter) != 1:
        raise ConfigError(f"{where}.delimiter: {t.delimiter!r} must be one character")
    if not t.header and not t.columns:
        raise ConfigError(f"{where}.columns: a table without a header row needs its column names in order")
    if isinstance(t, TableSpec) and t.regex is not None:
        compile_regex(t.regex.pattern, f"{where}.regex.pattern")
        _need(t.regex.column, set(t.columns), f"{where}.regex.column", "column")
    _need(template_fields(t.key, f"{where}.key"), table_fields(t), f"{where}.key")


def _template(template: str, entry: SourceEntry, where: str) -> None:
    """A path template over the file's fields, relative to the entry folder."""
    _relative(template, where)
    _need(template_fields(template, where), file_fields(entry), where)


def _check_reader(entry: SourceEntry, where: str) -> None:
    """The reader's spec: present where the reader needs it, absent on any other reader, every value sane."""
    for key, reader in SPEC_OF.items():
        if getattr(entry, key) is not None and entry.reader != reader:
            raise ConfigError(f"{where}.{key}: only for reader {reader!r} (this entry's reader is {entry.reader!r})")
    for key in ("video", "mat", "hdf5"):
        if entry.reader == key and getattr(entry, key) is None:
            raise ConfigError(f"{where}.{key}: reader {key!r} needs it (see DESIGN §10, Source descriptions)")
    v = entry.video
    if v is not None:
        _template(v.annotations, entry, f"{where}.video.annotations")
        if v.fps <= 0 or v.every < 1:
            raise ConfigError(f"{where}.video: fps must be > 0 and every >= 1 (got {v.fps}, {v.every})")
        if not v.columns:
            raise ConfigError(f"{where}.video.columns: name the annotation's columns (they become per-frame fields)")
        _need(v.frame, set(v.columns), f"{where}.video.frame", "column")
        if "index" in v.columns:
            raise ConfigError(f"{where}.video.columns: 'index' is the frame number's field; rename the column")
        _check_table(TableSpec(v.annotations, "", v.columns, {}, v.header, v.delimiter, v.encoding), where + ".video")
    if entry.mat is not None:
        if not entry.mat.image or "index" in entry.mat.fields:
            raise ConfigError(f"{where}.mat: image is a dataset path; fields may not be named 'index'")
    if entry.hdf5 is not None and not entry.hdf5.dataset:
        raise ConfigError(f"{where}.hdf5.dataset: empty")
    vol = entry.volume
    if vol is not None:
        if vol.axis not in (0, 1, 2) or vol.every < 1 or not 0.0 <= vol.keep[0] < vol.keep[1] <= 1.0:
            raise ConfigError(f"{where}.volume: axis 0-2, every >= 1 and 0 <= keep[0] < keep[1] <= 1 (got {vol})")
        if vol.channel < 0:
            raise ConfigError(f"{where}.volume.channel: {vol.channel} must be >= 0 (a 4-D file's volume index)")
        if vol.mask:
            _template(vol.mask, entry, f"{where}.volume.mask")
    w = entry.wsi
    if w is not None:
        if (w.level is not None and w.level < 0) or (w.patch_size is not None and w.patch_size < 8):
            raise ConfigError(f"{where}.wsi: level >= 0 and patch_size >= 8")
        if (w.overlap is not None and not 0 <= w.overlap <= 0.1) or (
            w.tissue_fraction is not None and not 0 <= w.tissue_fraction <= 1
        ):
            raise ConfigError(f"{where}.wsi: overlap in [0, 0.1] and tissue_fraction in [0, 1]")
        if w.magnification is not None and not 0 <= w.magnification <= 100:
            raise ConfigError(f"{where}.wsi.magnification: in [0, 100] (0: use wsi.level)")
    les = entry.lesions
    if les is not None:
        if bool(les.annotations) == bool(les.masks):
            raise ConfigError(f"{where}.lesions: give exactly one of annotations (ASAP XML) and masks (TIFF)")
        if les.annotations:
            _template(les.annotations, entry, f"{where}.lesions.annotations")
        else:
            _template(les.masks, entry, f"{where}.lesions.masks")
        if les.positive not in entry.label.classes.values():
            raise ConfigError(f"{where}.lesions.positive: {les.positive!r} is not a phrase of label.classes")
        if not les.negative.strip() or not 0 <= les.normal_max < les.tumour_min <= 1 or les.per_slide < 0:
            raise ConfigError(
                f"{where}.lesions: negative is a phrase; need 0 <= normal_max < tumour_min <= 1, per_slide >= 0"
            )


def _check_files(entry: SourceEntry, where: str) -> None:
    _relative(entry.files.glob, f"{where}.files.glob")
    for reason, pattern in entry.files.exclude.items():
        _relative(pattern, f"{where}.files.exclude[{reason!r}]")
    if entry.files.regex:
        compile_regex(entry.files.regex, f"{where}.files.regex")
    known = file_fields(entry) | element_fields(entry)
    _need(template_fields(entry.files.key, f"{where}.files.key"), known, f"{where}.files.key")
    for i, t in enumerate(entry.tables):
        _check_table(t, f"{where}.tables[{i}]")
    main = set().union(*(table_fields(t) for t in entry.tables)) if entry.tables else set()
    if entry.join and not entry.tables:
        raise ConfigError(f"{where}.join: needs at least one table to join onto")
    for j, t in enumerate(entry.join):
        _check_table(t, f"{where}.join[{j}]")
        _need(template_fields(t.on, f"{where}.join[{j}].on"), main, f"{where}.join[{j}].on")
        main |= table_fields(t)


def _check_label(entry: SourceEntry, where: str, known: set[str]) -> None:
    label = entry.label
    if bool(label.field) == bool(label.columns):
        raise ConfigError(f"{where}.label: give either field (single-valued) or columns (one per finding)")
    if label.list and not label.field:
        raise ConfigError(f"{where}.label.list: only with label.field")
    _need(label.field or label.columns, known, f"{where}.label.{'field' if label.field else 'columns'}")
    if not label.classes:
        raise ConfigError(f"{where}.label.classes: empty (value -> caption phrase)")
    if any(not p.strip() for p in label.classes.values()):
        raise ConfigError(f"{where}.label.classes: a caption phrase is empty")


def _check_rules(entry: SourceEntry, where: str, known: set[str]) -> None:
    if entry.group is not None:
        _need(entry.group.field, known, f"{where}.group.field")
        if entry.group.regex:
            compile_regex(entry.group.regex, f"{where}.group.regex")
    for i, f in enumerate(entry.filters):
        _need(f.field, known, f"{where}.filters[{i}].field")
        if sum((f.in_ is not None, f.not_in is not None, bool(f.regex))) != 1:
            raise ConfigError(f"{where}.filters[{i}]: give exactly one of in, not_in, regex")
        if f.regex:
            compile_regex(f.regex, f"{where}.filters[{i}].regex")
    if entry.split is not None:
        _need(entry.split.field, known, f"{where}.split.field")
        bad = sorted({v for v in entry.split.map.values() if v not in SPLITS})
        if bad or not entry.split.map:
            raise ConfigError(f"{where}.split.map: targets must be train, val or test (got {bad or 'nothing'})")
    caps = entry.caps
    if isinstance(caps.per_class, str) and caps.per_class != "min":
        raise ConfigError(f"{where}.caps.per_class: {caps.per_class!r} is not an integer, 'min' or a mapping")
    single = entry.label.field and not entry.label.list and entry.rows == "agree"  # one phrase per file
    unknown = sorted(set(caps.per_class) - entry.phrases()) if isinstance(caps.per_class, dict) and single else []
    if unknown:  # a key that is no label text would cap nothing, silently
        raise ConfigError(f"{where}.caps.per_class: {', '.join(map(repr, unknown))} is not a phrase of label.classes")
    counts = caps.per_class.values() if isinstance(caps.per_class, dict) else [caps.per_class]
    if any(isinstance(n, int) and n < 0 for n in (*counts, caps.per_group, caps.total)):
        raise ConfigError(f"{where}.caps: caps must be >= 0 (0 = no cap)")


def _check_caption(entry: SourceEntry, where: str, known: set[str]) -> None:
    names = template_fields(entry.caption, f"{where}.caption")
    if "label" not in names:
        raise ConfigError(f"{where}.caption {entry.caption!r} has no {{label}} placeholder")
    undefined = [n for n in names if n != "label" and n not in entry.caption_fields]
    if undefined:
        raise ConfigError(
            f"{where}.caption: field(s) {', '.join('{' + n + '}' for n in undefined)} not defined in caption_fields"
        )
    for name, cf in entry.caption_fields.items():
        _need(cf.field, known, f"{where}.caption_fields.{name}.field")
        if not cf.map:
            raise ConfigError(f"{where}.caption_fields.{name}.map: empty (value -> phrase)")


def parse_entry(raw: dict, where: str) -> SourceEntry:
    """One catalog entry, every key and rule checked; errors name ``where``, the entry and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (a source entry), got {type(raw).__name__}")
    name = raw.get("name")
    where = f"{where}: source {name!r}" if isinstance(name, str) else where
    raw = dict(raw)
    if isinstance(raw.get("join"), list):  # YAML 1.1 reads a bare `on:` key as the boolean True
        raw["join"] = [
            {("on" if k is True else k): v for k, v in j.items()} if isinstance(j, dict) else j for j in raw["join"]
        ]
    if isinstance(raw.get("filters"), list):  # `in` is a Python keyword: the field is in_
        raw["filters"] = [
            {("in_" if k == "in" else k): v for k, v in f.items()} if isinstance(f, dict) else f for f in raw["filters"]
        ]
    try:
        entry = build(SourceEntry, raw, where)
    except ConfigError as exc:  # say `in` as the user wrote it
        raise ConfigError(re.sub(r"\bin_\b", "in", str(exc))) from None
    if not entry.name or "/" in entry.name or entry.name.startswith("."):
        raise ConfigError(f"{where}.name: {entry.name!r} must be a plain folder name")
    if entry.specialty not in SPECIALTIES:
        raise ConfigError(f"{where}.specialty: {entry.specialty!r} is not one of {', '.join(SPECIALTIES)}")
    if entry.image_type not in IMAGE_TYPES:
        raise ConfigError(f"{where}.image_type: {entry.image_type!r} is not one of {', '.join(IMAGE_TYPES)}")
    _check_files(entry, where)
    _check_reader(entry, where)
    known = all_fields(entry)
    _check_label(entry, where, known)
    _check_rules(entry, where, known)
    _check_caption(entry, where, known)
    check_entry(entry, where)  # no date, number or placeholder in what reaches a caption
    return entry


SETTINGS_SPECS = {"caps": CapsSpec, "wsi": WsiSpec, "lesions": LesionSpec, "video": VideoSpec, "volume": VolumeSpec}
SETTINGS = tuple(SETTINGS_SPECS)  # what ingest.source_settings may change: not the layout


def with_settings(raw: dict, settings: dict, where: str) -> dict:
    """An entry's raw mapping with a run's overrides of its reading settings (``ingest.source_settings.<entry>``)
    merged key by key: a demo or a trial run caps, tiles or samples differently without editing the catalog."""
    raw = dict(raw)
    for section, values in settings.items():
        if section not in SETTINGS:
            raise ConfigError(
                f"{where}.{section}: not a setting a run may change; choose from {', '.join(SETTINGS)} "
                "(files, tables and labels describe the download: edit the catalog)"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.{section}: expected a mapping of its keys, got {values!r}")
        spec = SETTINGS_SPECS[section]
        known = {f.name for f in dataclasses.fields(spec)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{where}.{section}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"{section} has {', '.join(sorted(known))}"
            )
        raw[section] = {**(raw.get(section) or {}), **values}
    return raw


def load_catalog(name_or_path: str, settings: dict | None = None) -> tuple[SourceEntry, ...]:
    """The entries of a catalog: a bare name under ``jobs/configs/sources`` (``paper``) or a YAML path;
    ``settings`` (entry -> section -> keys) overrides entries' caps, wsi, lesions, video or volume settings."""
    path = named_file(name_or_path, SOURCES_DIR, "ingest.sources")
    data = load_yaml_file(path, "ingest.sources")
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        raise ConfigError(f"{path.name}: expected a mapping with a 'sources' list")
    extra = sorted(set(data) - {"sources"})
    if extra:
        raise ConfigError(f"{path.name}: unknown key(s) {', '.join(map(repr, extra))}; a catalog holds 'sources'")
    settings = settings or {}
    raw_names = [raw.get("name") for raw in data["sources"] if isinstance(raw, dict)]
    unknown = [n for n in settings if n not in raw_names]
    if unknown:
        raise ConfigError(
            f"ingest.source_settings: no entr{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))} "
            f"in {path.name}; its entries: {', '.join(map(str, raw_names))}"
        )
    entries = tuple(
        parse_entry(
            with_settings(raw, settings[raw["name"]], f"ingest.source_settings.{raw['name']}")
            if isinstance(raw, dict) and raw.get("name") in settings
            else raw,
            f"{path.name}: sources[{i}]",
        )
        for i, raw in enumerate(data["sources"])
    )
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path.name}: entry names must be unique; repeated: {', '.join(dupes)}")
    return entries

"""``medisyn reader build``: a blinded study from the corpus test split and a synthetic set.

Per study, half the images are real test images and half synthetic, each half balanced across
the study's classes (a seeded draw). Every image is re-encoded the same way — one size, one
mode, uncompressed BMP without metadata — so every served file of a study has the same byte
length and header: a compressed file's size follows its content and would tell origin apart,
and a colour cast would too, so a study whose real images are grey shows every image in grey.
Files get random names and one timestamp; the key (origin, class) stays in the database. Each
showing is served with its own imperceptible pixel noise (``vary``), so hashing a reader's
images does not pair an image's two showings. Folders are 0700, files 0600.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.phrases import check_classes, corpus_phrases
from medisyn.reader import db
from medisyn.reader.config import ReaderConfig, Study, load_studies, study_needs
from medisyn.records import decode_rgb, read_corpus, read_images, read_manifest

log = logging.getLogger("medisyn.reader")

MEDIA_TYPE = "image/bmp"


def reader_dir(cfg) -> Path:
    """``reader.dir`` with ``{run_dir}`` filled in: a local folder (ReaderConfig refuses URIs)."""
    if "{run_dir}" in cfg.reader.dir and storage.is_remote(cfg.run_dir):
        raise ConfigError(
            f"reader.dir: the run dir {cfg.run_dir} is on object storage; set reader.dir to a local folder "
            "(the study's SQLite database needs a disk)"
        )
    return Path(cfg.reader.dir.replace("{run_dir}", cfg.run_dir)).resolve()


def encode(data: bytes, size: int, grey: bool) -> bytes:
    """Stored image bytes -> the study's one encoding: ``size``² BMP, L or RGB, no metadata."""
    im = Image.fromarray(decode_rgb(data, (size, size)))
    out = io.BytesIO()
    (im.convert("L") if grey else im).save(out, format="BMP")
    return out.getvalue()


def vary(data: bytes, key: str, share: float = 1 / 16) -> bytes:
    """A BMP's bytes with the lowest bit of ``share`` of its pixel bytes flipped (±1 of 255), at
    places drawn from ``key``: the showing's item id and the image's secret file name, so a
    reader, who knows the id but not the name, can neither undo nor predict it. Length and headers
    stay as they were; row padding is left alone."""
    offset = int.from_bytes(data[10:14], "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = abs(int.from_bytes(data[22:26], "little", signed=True))
    bpp = int.from_bytes(data[28:30], "little")
    stride = (width * bpp + 31) // 32 * 4
    pixels = np.frombuffer(data, np.uint8, count=stride * height, offset=offset).reshape(height, stride).copy()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "little"))
    used = pixels[:, : width * bpp // 8]
    used ^= (rng.random(used.shape) < share).astype(np.uint8)  # a view: flips the bits in ``pixels``
    return data[:offset] + pixels.tobytes() + data[offset + stride * height :]


def _balanced(n: int, classes: tuple[str, ...]) -> dict[str, int]:
    """``n`` split across classes as equally as possible (the first classes take the remainder)."""
    return {c: n // len(classes) + (i < n % len(classes)) for i, c in enumerate(classes)}


def _draw(pool: dict[str, list[str]], need: dict[str, int], rng, study: Study, what: str) -> dict[str, list[str]]:
    out = {}
    for cls, n in need.items():
        have = sorted(pool.get(cls, []))
        if len(have) < n:
            raise ConfigError(
                f"reader study {study.name!r}: class {cls!r} has {len(have)} {what} images, the study needs {n} "
                "(lower reader.images_per_study, or generate/ingest more)"
            )
        out[cls] = sorted(have[i] for i in rng.choice(len(have), n, replace=False))
    return out


def select(cfg, study: Study) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """The study's draw: ``({class: real ids}, {class: synthetic ids}, {synthetic id: file})``."""
    rc: ReaderConfig = cfg.reader
    real_rows = read_corpus(
        cfg.run_path / "corpus",
        ["id", "labels", "specialty", "image_type", "source", "split"],
        where=pc.field("split").isin(list(rc.real_splits)),
    ).to_pylist()
    real: dict[str, list[str]] = {}
    for r in real_rows:
        cls = study.label_of(r["labels"])
        ok = r["specialty"] == study.specialty and r["image_type"] == study.image_type
        if ok and cls and (not study.sources or r["source"] in study.sources):
            real.setdefault(cls, []).append(r["id"])
    set_dir = cfg.run_path / "synthetic" / study.synthetic_set
    try:
        manifest = read_manifest(set_dir, ["id", "file", "labels", "specialty", "image_type"]).to_pylist()
    except FileNotFoundError:
        raise ConfigError(
            f"reader study {study.name!r}: synthetic set {study.synthetic_set!r} has no manifest at {set_dir}; "
            f"generate it first (generate.sets=[{study.synthetic_set}])"
        ) from None
    synthetic: dict[str, list[str]] = {}
    files = {}
    for r in manifest:
        cls = study.label_of(r["labels"])
        if cls and r["specialty"] == study.specialty and r["image_type"] == study.image_type:
            synthetic.setdefault(cls, []).append(r["id"])
            files[r["id"]] = r["file"]
    need = _balanced(rc.images_per_study // 2, study.classes)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(study.name.encode())])
    what = f"real {'/'.join(rc.real_splits)}"
    return _draw(real, need, rng, study, what), _draw(synthetic, need, rng, study, "synthetic"), files


def build_study(cfg, study: Study, conn, out: Path) -> bool:
    """Build one study into the database and ``out/images``; False when it is already built."""
    rc: ReaderConfig = cfg.reader
    real, synthetic, files = select(cfg, study)
    chosen = sorted(
        [("real", c, i) for c, ids in real.items() for i in ids]
        + [("synthetic", c, i) for c, ids in synthetic.items() for i in ids]
    )
    settings = {
        "images_per_study": rc.images_per_study,
        "real_splits": list(rc.real_splits),
        "repeat_fraction": rc.repeat_fraction,
        "image_size": rc.image_size,
        "seed": cfg.seed,
        "synthetic_set": study.synthetic_set,
        "classes": list(study.classes),
        "question": study.question,
        "images": hashlib.sha256(json.dumps(chosen).encode()).hexdigest(),
    }
    old = db.study_settings(conn, study.name)
    if old == settings:
        log.info("reader study %s: already built", study.name)
        return False
    if old is not None:
        readers = conn.execute("SELECT COUNT(*) FROM readers WHERE study = ?", (study.name,)).fetchone()[0]
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if readers:
            raise ConfigError(
                f"reader study {study.name!r} has {readers} readers and its settings changed ({', '.join(changed)}); "
                "build the new study into another reader.dir"
            )
        _drop(conn, study.name, out)

    real_bytes = read_images(cfg.run_path / "corpus", [i for ids in real.values() for i in ids])
    set_dir = cfg.run_path / "synthetic" / study.synthetic_set
    raw = {("real", i): real_bytes[i] for ids in real.values() for i in ids}
    raw.update({("synthetic", i): (set_dir / files[i]).read_bytes() for ids in synthetic.values() for i in ids})
    grey = all(Image.open(io.BytesIO(real_bytes[i])).mode in ("L", "I;16", "I") for ids in real.values() for i in ids)

    rng = np.random.default_rng([cfg.seed, zlib.crc32(study.name.encode()), 1])
    order = rng.permutation(len(chosen))  # files written and numbered in a shuffled order
    n_repeat = round(rc.repeat_fraction * len(chosen))
    repeated = set(rng.choice(len(chosen), n_repeat, replace=False).tolist()) if n_repeat else set()
    images_dir = db.private_dir(out / "images")
    stamp = time.time()
    rows, items = [], []
    for k in order:
        origin, cls, source_id = chosen[k]
        name = db.new_id()
        path = images_dir / f"{name}.bmp"
        db.write_private(path, encode(raw[(origin, source_id)], rc.image_size, grey))
        os.utime(path, (stamp, stamp))
        rows.append((origin, cls, source_id, name))
        items.append((len(rows), 1))
        if k in repeated:
            items.append((len(rows), 2))
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO studies(name, question, classes, greyscale, seed, settings, built_at) VALUES (?,?,?,?,?,?,?)",
            (
                study.name,
                study.question,
                json.dumps(study.classes),
                int(grey),
                cfg.seed,
                json.dumps(settings),
                db.now(),
            ),
        )
        ids = []
        for origin, cls, source_id, name in rows:
            cur = conn.execute(
                "INSERT INTO images(study, origin, truth, source_id, file) VALUES (?,?,?,?,?)",
                (study.name, origin, cls, source_id, name),
            )
            ids.append(int(cur.lastrowid))
        conn.executemany(
            "INSERT INTO items(item_id, study, image_id, showing) VALUES (?,?,?,?)",
            [(db.new_id(), study.name, ids[k - 1], showing) for k, showing in items],
        )
    n_real = sum(len(v) for v in real.values())
    log.info(
        "reader study %s: %d real + %d synthetic images (%s per class), %d shown twice, %d items, %s, %d px",
        study.name,
        n_real,
        len(chosen) - n_real,
        "/".join(str(len(real[c])) for c in study.classes),
        n_repeat,
        len(items),
        "grey" if grey else "colour",
        rc.image_size,
    )
    return True


def _drop(conn, study: str, out: Path) -> None:
    """Remove a study that has no readers (its settings changed), files included."""
    files = [r["file"] for r in conn.execute("SELECT file FROM images WHERE study = ?", (study,))]
    with db.transaction(conn):
        conn.execute("DELETE FROM items WHERE study = ?", (study,))
        conn.execute("DELETE FROM images WHERE study = ?", (study,))
        conn.execute("DELETE FROM studies WHERE name = ?", (study,))
    for name in files:
        (out / "images" / f"{name}.bmp").unlink(missing_ok=True)


def tighten(out: Path) -> None:
    """Folders 0700 and files 0600 under ``out``: a study an earlier version built left them
    readable by every local user."""
    for path in out.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)


def run(cfg) -> Path:
    """Build every study of ``reader.studies_file`` (or those named in ``reader.studies``)."""
    studies = load_studies(cfg.reader.studies_file, cfg.reader.studies)
    check_classes(study_needs(studies), corpus_phrases(cfg.run_path / "corpus"), "the corpus's labels")
    out = reader_dir(cfg)
    conn = db.connect(out, create=True)
    tighten(out)
    try:
        for study in studies:
            build_study(cfg, study, conn, out)
    finally:
        conn.close()
    print(f"reader: {len(studies)} studies in {db.db_path(out)}; add readers with `medisyn reader add-reader`")
    return out

"""Where a run's files live: a local or NFS folder, or an object store URI, behind one API.

Every stage reads and writes the run directory through :func:`path` (a ``UPath`` from
universal_pathlib over fsspec: ``/``, ``exists``, ``read_text``, ``open``, ``glob`` and
``iterdir`` work the same on ``/data/run`` and ``s3://bucket/run``) and the few functions
below for what pathlib has no word for: parquet on any filesystem, writes that appear whole
or not at all, and a node-local copy of a folder for libraries that only read local disks
(``from_pretrained``). Ray Data and Ray Train get :func:`uri` and resolve the same URI with
pyarrow's filesystems. Credentials and endpoints come from the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, …), read the same way by fsspec and pyarrow.

Local paths are made absolute, never a URI turned into a local path: a relative path would
name a different folder on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from upath import UPath

LOCAL_PROTOCOLS = ("", "file", "local")


def path(x: str | os.PathLike) -> UPath:
    """A run location: ``s3://…`` (any fsspec URI) as given, a local path made absolute."""
    if isinstance(x, UPath) and (x.protocol not in LOCAL_PROTOCOLS or x.is_absolute()):
        return x
    s = os.fspath(x) if not isinstance(x, str) else x
    if "://" in s and not s.startswith("file://"):
        return UPath(s)
    return UPath(os.path.abspath(s.removeprefix("file://")))


def is_remote(p: str | os.PathLike) -> bool:
    return path(p).protocol not in LOCAL_PROTOCOLS


def uri(p: str | os.PathLike) -> str:
    """The string Ray Data, Ray Train and pyarrow resolve: ``s3://bucket/key`` or ``/abs/path``."""
    p = path(p)
    return str(p) if is_remote(p) else p.path


def _tmp(p: UPath) -> UPath:
    return p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")


def replace(src: UPath, dst: UPath) -> None:
    """Move ``src`` over ``dst``: a rename on a local disk; a server-side copy then delete on an
    object store, where the new object appears whole."""
    src, dst = path(src), path(dst)
    if is_remote(dst):
        dst.fs.mv(src.path, dst.path)
    else:
        os.replace(src.path, dst.path)


def write_bytes(data: bytes, p: str | os.PathLike) -> None:
    """Write a file that is either whole or absent (a killed writer leaves only a ``.*.tmp``)."""
    p = path(p)
    if is_remote(p):
        p.fs.pipe_file(p.path, data)  # one PUT: the object appears whole or not at all
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(p)
    tmp.write_bytes(data)
    os.replace(tmp.path, p.path)


def read_table(p: str | os.PathLike, **kwargs) -> pa.Table:
    p = path(p)
    if is_remote(p):
        return pq.read_table(p.path, filesystem=p.fs, **kwargs)
    return pq.read_table(p.path, **kwargs)


READ_BLOCK = 1 << 20  # an object store's read-ahead for parquet: s3fs's default 50 MiB block per read


def parquet_file(p: str | os.PathLike) -> pq.ParquetFile:
    """A parquet file to read a footer or a few row groups from. On an object store the file is opened
    with a 1 MiB block: s3fs reads ahead 50 MiB by default, so reading one image's row group of a
    corpus shard would fetch a large part of the shard."""
    p = path(p)
    if not is_remote(p):
        return pq.ParquetFile(p.path)
    try:
        return pq.ParquetFile(p.fs.open(p.path, "rb", block_size=READ_BLOCK))
    except TypeError:  # a filesystem without buffered files (memory://)
        return pq.ParquetFile(p.path, filesystem=p.fs)


def write_table(table: pa.Table, p: str | os.PathLike, **kwargs) -> None:
    """Write a parquet file that is either whole or absent."""
    with parquet_writer(p, table.schema, **kwargs) as writer:
        writer.write_table(table)


@contextlib.contextmanager
def parquet_writer(p: str | os.PathLike, schema: pa.Schema, **kwargs):
    """A ``pq.ParquetWriter`` whose file appears under ``p`` only when the block ends without an
    error: it streams to a temporary name first, so row groups never pile up in memory."""
    p = path(p)
    if not is_remote(p):
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(p)
    try:
        if is_remote(p):
            with p.fs.open(tmp.path, "wb") as f, pq.ParquetWriter(f, schema, **kwargs) as writer:
                yield writer
        else:
            with pq.ParquetWriter(tmp.path, schema, **kwargs) as writer:
                yield writer
    except BaseException:
        with contextlib.suppress(Exception):
            tmp.unlink()
        raise
    replace(tmp, p)


def parquet_is_whole(p: str | os.PathLike) -> bool:
    """True when ``p`` is a parquet file whose footer reads (a truncated file has none)."""
    try:
        parquet_file(p).metadata  # noqa: B018 - reading the footer is the check
        return True
    except (OSError, pa.ArrowException, ValueError):
        return False


@contextlib.contextmanager
def local_dir(p: str | os.PathLike):
    """A local folder with the contents of ``p``, for libraries that read only local disks
    (``from_pretrained``, ``torch.load``): the folder itself when it is local, else a
    temporary download removed after the block."""
    p = path(p)
    if not is_remote(p):
        yield Path(p.path)
        return
    with tempfile.TemporaryDirectory(prefix="medisyn-") as tmp:
        local = Path(tmp) / p.name
        p.fs.get(p.path.rstrip("/") + "/", str(local), recursive=True)
        yield local


def _cache_root() -> Path:
    """Where per-node copies of remote inputs live: ``MEDISYN_CACHE_DIR`` (a node-local NVMe disk on
    the cluster, set by cluster.yaml's start commands; ``MEDISYN_CACHE`` is read too), else
    ``<temp dir>/medisyn-cache``."""
    env = os.environ.get("MEDISYN_CACHE_DIR") or os.environ.get("MEDISYN_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "medisyn-cache"


# The weight files a model folder may carry that `from_pretrained` (no variant, safetensors preferred)
# never reads once the folder has its plain safetensors: other formats, fp16/ema variants, single-file
# checkpoints. ONNX/Flax/TF weights and the PyTorch pickles are what diffusers' own download skips.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx", ".pb", ".h5")
_PLAIN_SAFETENSORS = re.compile(
    r"(diffusion_pytorch_model|model|pytorch_model)(-\d{5}-of-\d{5})?\.safetensors"
)  # diffusion_pytorch_model.safetensors, model-00001-of-00002.safetensors; not name.fp16.safetensors


def diffusers_files(names: list[str]) -> list[str]:
    """The files of a diffusers model folder (relative POSIX names) that ``from_pretrained`` loads
    without a ``variant``: in a folder that holds a plain safetensors weight file (see
    ``_PLAIN_SAFETENSORS``), every other weight file is left out (``*.fp16.safetensors``, ``*.bin``,
    ``*.ckpt``, ``*.msgpack``, ``*.onnx``, …); a folder with only ``.bin`` weights keeps them. Beside
    a ``model_index.json`` (a pipeline's root) single-file checkpoints are left out too: the pipeline
    loads its components' folders. Configs, tokenizers and other small files are always kept."""
    by_folder: dict[str, list[str]] = {}
    for name in names:
        by_folder.setdefault(name.rpartition("/")[0], []).append(name)
    keep = []
    for folder, files in by_folder.items():
        base = {f.rpartition("/")[2] for f in files}
        plain = any(_PLAIN_SAFETENSORS.fullmatch(b) for b in base) or (folder == "" and "model_index.json" in base)
        for f in files:
            b = f.rpartition("/")[2]
            if plain and b.endswith(_WEIGHT_SUFFIXES) and not _PLAIN_SAFETENSORS.fullmatch(b):
                continue
            keep.append(f)
    return sorted(keep)


def _download(fs, pairs: list[tuple[str, str]]) -> None:
    """Fetch ``(remote path, local path)`` pairs in one batch (s3fs runs them concurrently)."""
    for _, local in pairs:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    if pairs:
        fs.get([r for r, _ in pairs], [lp for _, lp in pairs])


def cached_copy(p: str | os.PathLike, select: Callable[[list[str]], list[str]] | None = None) -> Path:
    """A local folder with the contents of ``p``: the folder itself when local; for a remote one a
    copy downloaded once per node and kept, keyed by the URI and its files' sizes and ETags, so a
    folder rewritten under the same name (a refit VAE, a new export) is downloaded again. For
    read-only inputs that many tasks on a node load, such as a model.

    ``select`` picks the files to fetch from the folder's relative names (``diffusers_files``: only
    what ``from_pretrained`` loads). The processes of a node that ask at once (8 train workers,
    generate actors) share one download: the first takes a file lock in the cache folder and the
    others wait for it, then find the copy complete."""
    p = path(p)
    if not is_remote(p):
        return Path(p.path)
    base = p.path.rstrip("/")
    found = {
        name[len(base) + 1 :]: info
        for name, info in p.fs.find(base, detail=True, refresh=True).items()
        if info.get("type", "file") == "file" and name.startswith(base + "/")
    }
    if not found:
        raise FileNotFoundError(f"{uri(p)}: no such folder")
    names = sorted(found) if select is None else sorted(select(sorted(found)))
    listing = [
        (n, found[n].get("size"), str(found[n].get("ETag") or found[n].get("LastModified") or "")) for n in names
    ]
    key = hashlib.sha256(json.dumps([uri(p), listing]).encode()).hexdigest()[:16]
    root = _cache_root()
    local = root / key / p.name
    if (local.parent / ".complete").exists():
        return local
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{key}.lock"):  # flock: released if the holder dies
        if not (local.parent / ".complete").exists():  # the lock's previous holder did not finish it
            tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=root))
            try:
                _download(p.fs, [(f"{base}/{n}", str(tmp / p.name / n)) for n in names])
                (tmp / p.name).mkdir(exist_ok=True)
                (tmp / ".complete").touch()
                shutil.rmtree(local.parent, ignore_errors=True)  # a copy a killed process left unfinished
                os.replace(tmp, local.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return local


@contextlib.contextmanager
def cached_dir(p: str | os.PathLike, select: Callable[[list[str]], list[str]] | None = None):
    """:func:`cached_copy` as a context manager (the copy stays for the node's next reader)."""
    yield cached_copy(p, select)


def upload_dir(local: str | os.PathLike, p: str | os.PathLike, last: str = "") -> None:
    """Copy a local folder to ``p``, replacing what is there. On an object store, where a folder
    cannot be renamed into place, the file named ``last`` (the record readers check) is copied
    after all the others, so a folder with that file is whole."""
    p = path(p)
    local = Path(local)
    if is_remote(p):
        if p.exists():
            p.fs.rm(p.path, recursive=True)
        files = sorted(f for f in local.rglob("*") if f.is_file())
        files = [f for f in files if f.relative_to(local).as_posix() != last] + [
            f for f in files if f.relative_to(local).as_posix() == last
        ]
        for f in files:
            p.fs.put_file(str(f), f"{p.path}/{f.relative_to(local).as_posix()}")
        return
    if Path(p.path).resolve() == local.resolve():
        return
    tmp = _tmp(p)
    Path(p.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(local, tmp.path)
    if p.exists():
        shutil.rmtree(p.path)
    os.replace(tmp.path, p.path)


def remove_tree(p: str | os.PathLike) -> None:
    p = path(p)
    if is_remote(p):
        if p.exists():
            p.fs.rm(p.path, recursive=True)
    else:
        shutil.rmtree(p.path, ignore_errors=True)


def sizes(folder: str | os.PathLike) -> dict[str, int]:
    """``{file name: bytes}`` of a folder's files from one listing (not one request per file)."""
    p = path(folder)
    if not is_remote(p):
        try:
            return {e.name: e.stat().st_size for e in os.scandir(p.path) if e.is_file()}
        except FileNotFoundError:
            return {}
    try:
        entries = p.fs.ls(p.path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}


def stat_ns(p: str | os.PathLike) -> tuple[int, int]:
    """(size in bytes, last-modified time in ns) on any filesystem."""
    p = path(p)
    if not is_remote(p):
        st = os.stat(p.path)
        return st.st_size, st.st_mtime_ns
    info = p.fs.info(p.path)
    return int(info["size"]), int(p.fs.modified(p.path).timestamp() * 1e9)


def cached_file(p: str | os.PathLike) -> Path:
    """A local path with the bytes of file ``p``: ``p`` itself when local, else a copy downloaded
    once per node (keyed by URI; the writer never changes a file under one name; one download
    under a file lock however many processes ask), for readers that need a real file
    (``np.load(mmap_mode="r")``)."""
    p = path(p)
    if not is_remote(p):
        return Path(p.path)
    root = _cache_root()
    key = hashlib.sha256(uri(p).encode()).hexdigest()[:16]
    local = root / key / p.name
    if local.exists():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{key}.lock"):
        if not local.exists():
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
            p.fs.get_file(p.path, str(tmp))
            os.replace(tmp, local)
    return local


@contextlib.contextmanager
def local_file(p: str | os.PathLike, suffix: str = ""):
    """A local path with the bytes of file ``p`` for the block: ``p`` itself when local, else a
    download into the cache folder (node-local disk), removed after the block. For files read once
    by libraries that open paths (OpenSlide needs one); the name is ``source<suffix>``, never the
    source's. A missing or unreadable ``p`` raises (``FileNotFoundError``, ``PermissionError``, …)."""
    p = path(p)
    if not is_remote(p):
        yield Path(p.path)
        return
    root = _cache_root() / "sources"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".src-", dir=root) as tmp:
        local = Path(tmp) / f"source{suffix}"
        p.fs.get_file(p.path, str(local))
        yield local


@contextlib.contextmanager
def local_s3(bucket: str):
    """An S3 server on 127.0.0.1 (moto's server mode, a test extra) holding an empty ``bucket``, for
    the tests and ``medisyn bench corpus --s3``; yields the environment that points fsspec, pyarrow
    and boto at it (the standard AWS variables, set in this process while it runs)."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

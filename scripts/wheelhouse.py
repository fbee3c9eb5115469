"""Wheels for a GPU node without a package index: ``make wheelhouse [PY=3.12] [HAVE=node-freeze.txt]``.

Run on a machine that has an index. pip resolves this project for the node's Python and platform
(``--python-version``, manylinux x86_64, binary wheels only; metadata only, nothing installed), and
every resolved wheel is downloaded into ``wheelhouse/py3XX`` with its exact version, plus setuptools
and wheel (the offline editable install builds the project with them). ``scripts/bench-gpu.sh``
installs from there with ``--no-index``.

``--have FILE`` (a ``pip freeze`` taken on the node): the names in it are not fetched, so only what
the node lacks travels (a node with its own CUDA torch keeps it). The wheelhouse then records them in
``node-has.txt``, and the install uses the node's packages and does not resolve (``--no-deps``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def platforms(glibc: str) -> list[str]:
    """pip's ``--platform`` matches tags exactly: every manylinux tag a node with this glibc runs."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux_{major}_{n}_x86_64" for n in range(minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def target_args(python: str, glibc: str) -> list[str]:
    plat = [a for p in platforms(glibc) for a in ("--platform", p)]
    return ["--python-version", python, "--implementation", "cp", "--only-binary=:all:", *plat]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def have_names(freeze: Path) -> set[str]:
    """Distribution names in a ``pip freeze`` / ``pip list --format=freeze`` output."""
    names = set()
    for line in freeze.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            names.add(canonical(re.split(r"[=<>!~ @\[;]", line, maxsplit=1)[0]))
    return names


def resolve(python: str, glibc: str) -> list[tuple[str, str]]:
    """(name, version) of every wheel the project needs on the node, by pip's resolver (no download)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *target_args(python, glibc),
               str(ROOT), "setuptools>=68", "wheel"]  # fmt: skip
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    own = canonical("medisyn")
    return sorted((m["name"], m["version"]) for m in (i["metadata"] for i in items) if canonical(m["name"]) != own)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", required=True, help="the node's Python, e.g. 3.12")
    p.add_argument("--have", type=Path, help="a pip freeze of the node: those packages are not fetched")
    p.add_argument("--glibc", default="2.28", help="the node's glibc (torch's wheels need 2.28)")
    p.add_argument("--dest", type=Path, default=ROOT / "wheelhouse")
    args = p.parse_args(argv)
    dest = args.dest / f"py{args.python.replace('.', '')}"
    dest.mkdir(parents=True, exist_ok=True)
    pins = resolve(args.python, args.glibc)
    skip = (have_names(args.have) if args.have else set()) - {"setuptools", "wheel"}  # the build needs recent ones
    fetch = [(n, v) for n, v in pins if canonical(n) not in skip]
    print(f"wheelhouse: {len(pins)} wheels for Python {args.python}; {len(pins) - len(fetch)} on the node; "
          f"fetching {len(fetch)} into {dest}")  # fmt: skip
    if fetch:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar", "off"]
        cmd = [*pip, "--dest", str(dest), *target_args(args.python, args.glibc), *(f"{n}=={v}" for n, v in fetch)]
        subprocess.run(cmd, check=True)  # files already there are kept, not fetched again
    (dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in fetch))
    marker = dest / "node-has.txt"
    if skip:
        marker.write_text("".join(f"{n}=={v}\n" for n, v in pins if canonical(n) in skip))
    elif marker.exists():
        marker.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

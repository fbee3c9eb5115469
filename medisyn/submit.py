"""Submitting a stage as a Ray job the same way every time, so that submitting twice runs once.

``python -m medisyn.submit STAGE --config FILE [key=value ...]`` (STAGE: a built stage or
``pipeline``) validates the config here, then submits ``python jobs/<stage>.py --config FILE ...``
through Ray's ``JobSubmissionClient`` with:

* a submission id derived from (run dir, stage, config hash): the same submission gets the same id,
  and Ray keeps one job per id, so a second submission attaches to the first job and tails its
  logs instead of starting another (``--attempt N`` asks for a fresh run of the same thing);
* metadata naming the run, stage, config file, config hash and git commit (shown in the dashboard);
* one CPU and no GPU reserved for the driver (``entrypoint_num_cpus=1``);
* ``jobs/runtime_env.yaml`` as the runtime environment, after a pre-flight that stops, naming the
  largest files, when the working directory would exceed Ray's upload limit.

``python -m medisyn.submit publish-cluster FILE`` (run on the head by ``cluster.yaml``) records the
cluster launcher's worker types in the cluster, for every stage's resource pre-flight
(``raytools.check_stage_resources``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from medisyn.config import ConfigError, RunConfig, load_config, to_dict
from medisyn.stages import STAGE_BY_NAME, STAGES

log = logging.getLogger(__name__)

RUNTIME_ENV_FILE = "jobs/runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # `ray dashboard cluster.yaml` forwards the head's dashboard here
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def config_hash(cfg: RunConfig) -> str:
    """12 hex digits over every resolved setting (not over where the YAML file sits)."""
    data = to_dict(cfg)
    data.pop("config_path", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def submission_id(run_dir: str, stage: str, chash: str, attempt: int = 1) -> str:
    """``medisyn-<run name>-<stage>-<digest of run dir, stage and config hash>[-a<attempt>]``."""
    if attempt < 1:
        raise ConfigError(f"--attempt: {attempt} is below 1")
    name = re.sub(r"[^a-z0-9]+", "-", run_dir.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:40] or "run"
    digest = hashlib.sha256(f"{run_dir}\0{stage}\0{chash}".encode()).hexdigest()[:12]
    return f"medisyn-{name}-{stage}-{digest}" + (f"-a{attempt}" if attempt > 1 else "")


def git_commit(root: Path) -> str:
    """HEAD's commit, ``+dirty`` when tracked files differ from it; ``unknown`` outside a checkout.
    Read-only: ``--no-optional-locks`` keeps ``git status`` from touching the index."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if changed else "")


def job_metadata(cfg: RunConfig, stage: str, chash: str, config_file: str, root: Path) -> dict[str, str]:
    """What the dashboard shows with the job (``ray job list``, ``/api/jobs/``): strings only."""
    return {
        "run": cfg.run_dir,
        "stage": stage,
        "config": config_file,
        "config_hash": chash,
        "git_commit": git_commit(root),
    }


def load_runtime_env(root: Path) -> dict:
    """``jobs/runtime_env.yaml`` with its working dir resolved against the project root."""
    env = yaml.safe_load((root / RUNTIME_ENV_FILE).read_text()) or {}
    env["working_dir"] = str((root / env.get("working_dir", ".")).resolve())
    return env


def upload_files(working_dir: Path, excludes: list[str]) -> list[tuple[str, int]]:
    """(path relative to ``working_dir``, bytes) of every file Ray would package for the job: Ray's
    own walk, with the runtime env's ``excludes`` and the ``.gitignore``/``.rayignore`` files it honours."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = working_dir.resolve()
    found: list[tuple[str, int]] = []

    def handler(path: Path) -> None:
        if path.is_file():
            found.append((str(path.relative_to(root)), path.stat().st_size))

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore=include_gitignore)
    return found


def upload_limit() -> int:
    """Ray's limit on one runtime-env package (``GCS_STORAGE_MAX_SIZE``, 512 MiB in Ray 2.60)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


def check_upload_size(working_dir: Path, excludes: list[str], limit: int | None = None) -> int:
    """Total bytes Ray would upload; stops before the upload, naming the largest files, when the
    total (uncompressed, an upper bound of the zip for files that do not compress) reaches ``limit``."""
    files = upload_files(working_dir, excludes)
    total = sum(size for _, size in files)
    limit = upload_limit() if limit is None else limit
    if total >= limit:
        largest = sorted(files, key=lambda f: -f[1])[:5]
        names = ", ".join(f"{p} ({size / 2**20:.1f} MiB)" for p, size in largest)
        raise ConfigError(
            f"the job's working dir {working_dir} holds {total / 2**20:.1f} MiB to upload, at or above Ray's limit of "
            f"{limit / 2**20:.0f} MiB; largest: {names}. Add them to `excludes` in {RUNTIME_ENV_FILE} (data belongs "
            "in the run directory or object storage, not in the code upload)"
        )
    return total


def default_run_dir(cluster_doc: dict, config_file: str) -> str | None:
    """``<metadata.medisyn.run_root of cluster.yaml>/<config file stem>``, or None without a run root."""
    root = ((cluster_doc.get("metadata") or {}).get("medisyn") or {}).get("run_root")
    return f"{root.rstrip('/')}/{Path(config_file).stem}" if root else None


def entrypoint(stage: str, config_file: str, overrides: list[str]) -> str:
    job = "pipeline.py" if stage == "pipeline" else STAGE_BY_NAME[stage].job
    return shlex.join(["python", f"jobs/{job}", "--config", config_file, *overrides])


def submit(
    client,
    stage: str,
    config_file: str,
    overrides: list[str],
    root: Path,
    attempt: int = 1,
) -> tuple[str, bool]:
    """Submit ``stage`` (or attach to the job already submitted with the same id): (id, attached).

    ``client`` is a ``ray.job_submission.JobSubmissionClient``; ``config_file`` is relative to
    ``root``, the project directory the job runs in."""
    if stage != "pipeline" and (stage not in STAGE_BY_NAME or not STAGE_BY_NAME[stage].built):
        raise ConfigError(f"{stage!r} is not a built stage; choose pipeline or {', '.join(built_stages())}")
    path = (root / config_file).resolve()
    try:
        rel = str(path.relative_to(root.resolve()))
    except ValueError:
        raise ConfigError(f"--config: {config_file} is outside {root}, so the job would not find it") from None
    cfg = load_config(path, overrides)
    chash = config_hash(cfg)
    sid = submission_id(cfg.run_dir, stage, chash, attempt)
    if _job_exists(client, sid):
        return sid, True
    env = load_runtime_env(root)
    size = check_upload_size(Path(env["working_dir"]), env.get("excludes", []))
    log.info("submit: %s (%.1f MiB of code)", sid, size / 2**20)
    try:
        client.submit_job(
            entrypoint=entrypoint(stage, rel, overrides),
            submission_id=sid,
            runtime_env=env,
            metadata=job_metadata(cfg, stage, chash, rel, root),
            entrypoint_num_cpus=1,
            entrypoint_num_gpus=0,
        )
    except RuntimeError as exc:  # submitted by someone else between the look-up and now
        if "already exists" not in str(exc):
            raise
        return sid, True
    return sid, False


def _job_exists(client, sid: str) -> bool:
    try:
        client.get_job_info(sid)
    except RuntimeError as exc:  # the job API answers 404 for an unknown id
        if "404" in str(exc) or "does not exist" in str(exc):
            return False
        raise
    return True


def follow(client, sid: str, out=sys.stdout) -> str:
    """Print the job's logs until it ends (from the start, for an attached job too); its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(sid).value)


def built_stages() -> list[str]:
    return [s.name for s in STAGES if s.built]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medisyn.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", DEFAULT_ADDRESS),
        help=f"the cluster's job API (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--project", default=".", help="project directory the job runs in (default: .)")
    parser.add_argument(
        "--cluster", help="cluster.yaml: run_dir defaults to its metadata.medisyn.run_root/<config file stem>"
    )
    parser.add_argument("--attempt", type=int, default=1, help="run the same submission anew (2, 3, ...)")
    parser.add_argument("--no-follow", action="store_true", help="submit (or find) the job and return")
    parser.add_argument("stage", choices=[*built_stages(), "pipeline", "publish-cluster"], metavar="stage")
    parser.add_argument("--config", "-c", help="run configuration YAML, relative to --project")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # stage, --config, then key=value overrides
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.stage == "publish-cluster":  # on the head, after `ray start`: FILE is the launcher config
        gcs = None if "://" in args.address else args.address  # a GCS host:port, not the job API's URL
        return _publish_cluster(args.config or (args.overrides[0] if args.overrides else ""), gcs)
    root = Path(args.project).resolve()
    overrides = list(args.overrides)
    if args.cluster and not any(o.startswith("run_dir=") for o in overrides):
        run_dir = default_run_dir(yaml.safe_load(Path(args.cluster).read_text()) or {}, args.config or "")
        if run_dir:
            overrides.append(f"run_dir={run_dir}")
    if not args.config:
        print("medisyn.submit: --config FILE is required", file=sys.stderr)
        return 2
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        sid, attached = submit(client, args.stage, args.config, overrides, root, args.attempt)
    except ConfigError as exc:
        print(f"medisyn.submit: {exc}", file=sys.stderr)
        return 2
    print(f"{'attached to' if attached else 'submitted'} {sid}", file=sys.stderr)
    if args.no_follow:
        return 0
    status = follow(client, sid)
    print(f"{sid}: {status}", file=sys.stderr)
    if attached and status in ("FAILED", "STOPPED"):
        print(f"to run it anew: the same command with --attempt {args.attempt + 1}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _publish_cluster(config_file: str, address: str | None) -> int:
    import ray

    from medisyn.raytools import publish_autoscaling_groups

    if not config_file:
        print("medisyn.submit publish-cluster: give the launcher config (~/ray_bootstrap_config.yaml)", file=sys.stderr)
        return 2
    doc = yaml.safe_load(Path(os.path.expanduser(config_file)).read_text()) or {}
    ray.init(address=address or "auto", configure_logging=False, log_to_driver=False)
    try:
        groups = publish_autoscaling_groups(doc)
    finally:
        ray.shutdown()
    print(f"published {len(groups)} worker types: {', '.join(g['name'] for g in groups)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Submitting stages as Ray jobs (`medisyn/submit.py`) and the resource pre-flight (`raytools`).

Pure functions and a fake job client first (milliseconds); then one test against a real head
started with `ray start --head` on 127.0.0.1 with token authentication, its own ports and
temporary directory: refused without the token, the same submission twice gives one job.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import get_json, ray_head

from medisyn.config import ConfigError, load_config
from medisyn.raytools import groups_from_launcher_config, resource_shortfall, stage_requests
from medisyn.submit import (
    check_upload_size,
    config_hash,
    default_run_dir,
    entrypoint,
    load_runtime_env,
    submission_id,
    submit,
    upload_files,
    upload_limit,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = "jobs/configs/paper.yaml"


# --- ids, hashes, metadata -------------------------------------------------------------------


def test_the_submission_id_follows_run_stage_and_config():
    a = submission_id("s3://b/medisyn/paper", "train", "0123456789ab")
    assert a == submission_id("s3://b/medisyn/paper", "train", "0123456789ab")
    assert a.startswith("medisyn-paper-train-") and len(a) < 64
    others = {
        submission_id("s3://b/medisyn/paper2", "train", "0123456789ab"),
        submission_id("s3://b/medisyn/paper", "generate", "0123456789ab"),
        submission_id("s3://b/medisyn/paper", "train", "ba9876543210"),
        submission_id("s3://b/medisyn/paper", "train", "0123456789ab", attempt=2),
    }
    assert a not in others and len(others) == 4
    assert submission_id("/mnt/Shared/Run 1/", "ingest", "x").startswith("medisyn-run-1-ingest-")
    with pytest.raises(ConfigError, match="attempt"):
        submission_id("r", "ingest", "x", attempt=0)


def test_the_config_hash_covers_settings_not_the_files_location(tmp_path):
    base = load_config(ROOT / PAPER, ["run_dir=s3://b/r"])
    copy = tmp_path / "paper.yaml"
    shutil.copy(ROOT / PAPER, copy)
    assert config_hash(base) == config_hash(load_config(copy, ["run_dir=s3://b/r"]))
    assert config_hash(base) != config_hash(load_config(ROOT / PAPER, ["run_dir=s3://b/r", "train.epochs=14"]))


def test_the_cluster_definition_gives_the_default_run_dir():
    doc = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert default_run_dir(doc, PAPER) == "s3://my-bucket/medisyn/paper"
    assert default_run_dir({}, PAPER) is None
    assert entrypoint("train", PAPER, ["train.epochs=2"]) == f"python jobs/train.py --config {PAPER} train.epochs=2"
    assert entrypoint("pipeline", PAPER, []) == f"python jobs/pipeline.py --config {PAPER}"


# --- upload pre-flight ------------------------------------------------------------------------


def test_the_projects_upload_is_code_only_and_far_under_rays_limit():
    env = load_runtime_env(ROOT)
    files = dict(upload_files(Path(env["working_dir"]), env["excludes"]))
    assert "medisyn/submit.py" in files and "jobs/pipeline.py" in files
    assert not [f for f in files if f.split("/")[0] in (".git", ".venv", "runs", "data")]
    total = check_upload_size(Path(env["working_dir"]), env["excludes"])
    assert total < 20 * 2**20 < upload_limit() // 10


def test_the_upload_pre_flight_names_the_largest_files(tmp_path):
    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 3_000_000)
    (tmp_path / "notes.txt").write_bytes(b"x" * 1_000_000)
    for skipped in ("data/scan.bin", "runs/demo/corpus.bin", ".venv/lib.so", ".git/pack", "corpus.parquet"):
        (tmp_path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped).write_bytes(b"\0" * 5_000_000)
    excludes = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())["excludes"]
    assert {f for f, _ in upload_files(tmp_path, excludes)} == {"code.py", "weights.bin", "notes.txt"}
    with pytest.raises(ConfigError, match=r"largest: weights\.bin \(2\.9 MiB\), notes\.txt \(1\.0 MiB\), code\.py"):
        check_upload_size(tmp_path, excludes, limit=2_000_000)
    assert check_upload_size(tmp_path, excludes, limit=10_000_000) == 4_000_009


# --- submission with a fake client ------------------------------------------------------------


class FakeJobs:
    """What `submit` uses of JobSubmissionClient, with the job API's answers for a known/unknown id."""

    def __init__(self, race: bool = False):
        self.jobs: dict[str, dict] = {}
        self.race = race  # another client submits the same id between our look-up and our submission

    def get_job_info(self, sid):
        if sid not in self.jobs or self.race:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return self.jobs[sid]

    def submit_job(self, **kwargs):
        if kwargs["submission_id"] in self.jobs:
            raise RuntimeError(
                f"Request failed with status code 500: Job with submission_id {kwargs['submission_id']} already exists."
            )
        self.jobs[kwargs["submission_id"]] = kwargs
        return kwargs["submission_id"]


def test_a_second_submission_attaches_to_the_first_job():
    client = FakeJobs()
    args = ("train", PAPER, ["run_dir=s3://b/medisyn/paper"], ROOT)
    sid, attached = submit(client, *args)
    assert not attached and list(client.jobs) == [sid]
    job = client.jobs[sid]
    assert job["entrypoint"] == f"python jobs/train.py --config {PAPER} run_dir=s3://b/medisyn/paper"
    assert job["entrypoint_num_cpus"] == 1 and job["entrypoint_num_gpus"] == 0
    md = job["metadata"]
    assert md["run"] == "s3://b/medisyn/paper" and md["stage"] == "train" and md["config"] == PAPER
    assert sid == submission_id(md["run"], "train", md["config_hash"]) and len(md["git_commit"]) >= 7
    assert job["runtime_env"]["working_dir"] == str(ROOT) and ".git/" in job["runtime_env"]["excludes"]
    assert submit(client, *args) == (sid, True) and len(client.jobs) == 1
    assert submit(client, *args, attempt=2)[1] is False and len(client.jobs) == 2
    client.race = True
    assert submit(client, *args) == (sid, True) and len(client.jobs) == 2


def test_submission_stops_on_a_bad_stage_or_config_before_any_request():
    client = FakeJobs()
    with pytest.raises(ConfigError, match="not a built stage"):
        submit(client, "reviewers", PAPER, [], ROOT)
    with pytest.raises(ConfigError, match="train.epoch"):
        submit(client, "train", PAPER, ["train.epoch=2"], ROOT)
    with pytest.raises(ConfigError, match="outside"):
        submit(client, "train", "/etc/hostname", [], ROOT)
    assert client.jobs == {}


# --- resource pre-flight ----------------------------------------------------------------------

GPU_NODE = {"CPU": 192.0, "GPU": 8.0, "memory": 2e12}
CPU_NODE = {"CPU": 32.0}
HEAD = {"CPU": 0.0}


def test_requests_that_fit_now_or_after_autoscaling_pass():
    train = [{"CPU": 1, "GPU": 1}] * 4
    assert resource_shortfall(train, [HEAD, GPU_NODE]) is None
    assert resource_shortfall(train, [HEAD], [(CPU_NODE, 8), (GPU_NODE, 8)]) is None
    assert resource_shortfall([{"GPU": 1}] * 40, [HEAD], [(GPU_NODE, -1)]) is None  # unbounded type
    assert resource_shortfall([], [HEAD]) is None


def test_a_shortfall_is_named():
    train = [{"CPU": 1, "GPU": 1}] * 4
    assert resource_shortfall(train, [HEAD, CPU_NODE], [(CPU_NODE, 8)]) == (
        "asks for 4 x {CPU: 1, GPU: 1} = {CPU: 4, GPU: 4} in all; the cluster has {CPU: 32} now and at most "
        "{CPU: 256} with autoscaling: short of {GPU: 4}"
    )
    # nodes already up count against their type's maximum: one GPU node up of at most one
    assert "short of {GPU: 8}" in resource_shortfall([{"GPU": 1}] * 16, [HEAD, GPU_NODE], [(GPU_NODE, 1)])
    assert resource_shortfall([{"CPU": 64}], [HEAD], [(CPU_NODE, 8)]) == (
        "one of 1 x {CPU: 64} fits on no node: the largest offers {CPU: 32}"
    )
    assert resource_shortfall([{"CPU": 3}] * 2, [{"CPU": 4}, {"CPU": 2}]).startswith("2 x {CPU: 3} do not pack")


def test_each_stage_asks_for_what_its_code_requests():
    paper = load_config(ROOT / PAPER)
    demo = load_config(ROOT / "jobs/configs/demo.yaml")
    assert stage_requests("train", paper, gpus=True) == [{"CPU": 1.0, "GPU": 1}] * 4
    assert stage_requests("train", demo, gpus=False) == [{"CPU": 0.5, "GPU": 0}] * 2
    assert stage_requests("generate", paper, gpus=True) == [{"GPU": 1}]
    assert stage_requests("generate", paper, gpus=False) == [{"CPU": 1.0}]
    assert stage_requests("cache", paper, gpus=True) == [{"GPU": 1}] * 4
    assert stage_requests("audit-utility", paper, gpus=True) == [{"CPU": 4, "GPU": 0.5}]
    assert stage_requests("report", paper, gpus=True) == []
    assert stage_requests("vae", paper, gpus=False) == [] and stage_requests("vae", demo, gpus=False) == [{"CPU": 2.0}]
    # the paper's stages fit the shipped cluster definition, from a head alone
    groups = [(g["resources"], g["max_workers"]) for g in groups_from_launcher_config(_cluster())]
    for stage in ("ingest", "cache", "train", "select", "generate", "audit-memorization", "audit-utility"):
        assert resource_shortfall(stage_requests(stage, paper, gpus=True), [HEAD], groups) is None, stage
    # train asks for GPUs whatever the cluster has: a CPU-only cluster is told, not left PENDING
    assert "short of {GPU: 4}" in resource_shortfall(stage_requests("train", paper, gpus=False), [HEAD, CPU_NODE])


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_the_launcher_configs_worker_types():
    assert groups_from_launcher_config(_cluster()) == [
        {"name": "cpu_worker", "resources": {"CPU": 32.0}, "max_workers": 8},
        {"name": "gpu_worker", "resources": {"CPU": 192.0, "GPU": 8.0}, "max_workers": 8},
    ]


# --- a real head ------------------------------------------------------------------------------


TRIVIAL_JOB = """
import ray

ray.init()
from medisyn.raytools import autoscaling_groups, gpus_available

print("medisyn-test-job", sorted(int(s.get("GPU", 0)) for s, _ in autoscaling_groups()), gpus_available())
"""


@pytest.mark.slow  # ~35 s: a head, a published cluster definition, a job that joins the cluster
def test_submitting_twice_to_a_token_protected_head_runs_one_job(tmp_path):
    project = tmp_path / "project"
    (project / "jobs/configs").mkdir(parents=True)
    shutil.copy(ROOT / "jobs/runtime_env.yaml", project / "jobs/runtime_env.yaml")
    (project / "jobs/report.py").write_text(TRIVIAL_JOB)
    (project / "jobs/configs/t.yaml").write_text(f"run_dir: {tmp_path / 'run'}\n")
    with ray_head(tmp_path, num_cpus=2) as (url, gcs, token, env):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get_json(f"{url}/api/jobs/")
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            get_json(f"{url}/api/jobs/", "not-the-token")
        assert wrong.value.code == 403

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "medisyn.submit", *args],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )

        published = run("publish-cluster", str(ROOT / "cluster.yaml"), "--address", gcs)
        assert published.returncode == 0, published.stderr[-2000:]
        job = ("--address", url, "--project", str(project), "report", "--config", "jobs/configs/t.yaml")
        first, second = run(*job), run(*job)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert second.returncode == 0, second.stderr[-3000:]
        sid = first.stderr.split("submitted ", 1)[1].split()[0]
        assert f"attached to {sid}" in second.stderr
        # the job ran once; both saw its output, which counts the published GPU workers as reachable
        assert "medisyn-test-job [0, 8] True" in first.stdout and "medisyn-test-job [0, 8] True" in second.stdout
        jobs = [j for j in get_json(f"{url}/api/jobs/", token) if j.get("submission_id") == sid]
        assert len(jobs) == 1 and jobs[0]["status"] == "SUCCEEDED"
        assert jobs[0]["metadata"]["stage"] == "report" and jobs[0]["metadata"]["run"] == str(tmp_path / "run")
        assert {"config_hash", "git_commit", "config"} <= set(jobs[0]["metadata"])
        # the README's plain form works too: Ray's own CLI, the same runtime env, the token from the environment
        plain = subprocess.run(
            [
                str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", url,
                "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"), "--working-dir", str(project),
                "--entrypoint-num-cpus", "1", "--", "python", "jobs/report.py", "--config", "jobs/configs/t.yaml",
            ],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert plain.returncode == 0 and "medisyn-test-job" in plain.stdout, plain.stdout[-2000:] + plain.stderr[-2000:]


def test_the_command_line(monkeypatch, capsys):
    import ray.job_submission

    from medisyn import submit as sub

    client = FakeJobs()
    ends = iter(["SUCCEEDED", "FAILED"])
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: client)
    monkeypatch.setattr(sub, "follow", lambda c, sid: next(ends))
    common = ["--address", "http://127.0.0.1:1", "--project", str(ROOT), "--cluster", str(ROOT / "cluster.yaml")]
    assert sub.main([*common, "--no-follow", "train", "--config", PAPER]) == 0
    (sid,) = client.jobs
    assert client.jobs[sid]["metadata"]["run"] == "s3://my-bucket/medisyn/paper"  # from cluster.yaml
    assert "submitted" in capsys.readouterr().err
    assert sub.main([*common, "train", "--config", PAPER]) == 0  # attached, followed to SUCCEEDED
    assert sub.main([*common, "train", "--config", PAPER]) == 1  # attached, the job FAILED
    assert "--attempt 2" in capsys.readouterr().err and len(client.jobs) == 1
    assert sub.main([*common, "--no-follow", "--attempt", "2", "train", "--config", PAPER, "run_dir=/x"]) == 0
    assert {j["metadata"]["run"] for j in client.jobs.values()} == {"s3://my-bucket/medisyn/paper", "/x"}
    assert sub.main([*common, "train", "--config", PAPER, "train.epoch=1"]) == 2
    assert "train.epoch" in capsys.readouterr().err


@pytest.mark.ray
def test_the_pre_flight_on_a_live_cluster(ray_cluster):
    from medisyn.raytools import autoscaling_groups, check_stage_resources, gpus_available

    # a local cluster: what is up is all there is
    assert autoscaling_groups() == [] and gpus_available() == (ray_cluster.cluster_resources().get("GPU", 0) > 0)
    check_stage_resources("train", load_config(ROOT / "jobs/configs/demo.yaml"))  # 2 x 0.5 CPU fit 2 CPUs
    with pytest.raises(
        ConfigError, match=r"stage train asks for 4 x \{CPU: 1, GPU: 1\}.*short of \{CPU: 2, GPU: [34]\}"
    ):
        check_stage_resources("train", load_config(ROOT / PAPER))


@pytest.mark.ray
def test_every_stage_of_the_shipped_demos_fits_two_cpus_and_a_local_run_stops_on_one_that_never_would(
    ray_cluster, monkeypatch, tmp_path
):
    """demo-memorize once asked for Tune trials of 4 CPUs on 2 and sat PENDING for ever: a local run
    now gets the same pre-flight as a submitted job, and the demos' configs are held to 2 CPUs."""
    import medisyn.cli as cli
    from medisyn.raytools import check_stage_resources
    from medisyn.stages import STAGES

    for name in ("demo.yaml", "demo-memorize.yaml"):
        cfg = load_config(ROOT / "jobs/configs" / name)
        for stage in STAGES:
            check_stage_resources(stage.name, cfg)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ran = []
    monkeypatch.setattr(cli, "_stage_fn", lambda stage: ran.append)
    cfg = load_config(
        ROOT / "jobs/configs/demo-memorize.yaml", [f"run_dir={tmp_path}", "audit_utility.cpus_per_trial=4"]
    )
    with pytest.raises(ConfigError, match=r"stage audit-utility asks for 1 x \{CPU: 4(\.0)?\}.*short of \{CPU: 2"):
        cli.run_stage("audit-utility", cfg)
    assert ran == []
    cli.run_stage("report", cfg)  # the driver alone: nothing to check, no Ray needed
    assert ran == [cfg]

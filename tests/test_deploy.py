"""The cluster definitions users start from: `cluster.yaml` passes Ray's own cluster-launcher checks
and ours (explicit resources, bounds, token auth on every node, nothing that accepts code facing a
network), and `deploy/rayjob.yaml` uses only fields KubeRay's RayJob CRD has."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard and job API, Ray client


def exposures(doc: dict) -> list[str]:
    """What in a cluster-launcher config would expose the dashboard, job API, GCS or client."""
    found = []
    for cmd in doc.get("head_start_ray_commands", []) + doc.get("worker_start_ray_commands", []):
        for flag in ("--dashboard-host", "--ray-client-server-host", "--node-ip-address"):
            for part in cmd.split():
                if part.startswith(flag + "=") and part.split("=", 1)[1] in ("0.0.0.0", "::"):
                    found.append(f"{flag} binds every interface: {part}")
    for rule in ((doc.get("provider") or {}).get("security_group") or {}).get("IpPermissions", []):
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)) & RAY_PORTS
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        if ports and world:
            found.append(f"security group opens {sorted(ports)} to 0.0.0.0/0")
    return found


def test_the_shipped_cluster_exposes_no_ray_port():
    doc = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert exposures(doc) == []
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])


def test_the_check_catches_an_exposed_dashboard_and_an_open_security_group():
    doc = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    doc["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in doc["head_start_ray_commands"]]
    doc["provider"]["security_group"] = {
        "IpPermissions": [{"FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    }
    assert exposures(doc) == [
        "--dashboard-host binds every interface: --dashboard-host=0.0.0.0",
        "security group opens [8265] to 0.0.0.0/0",
    ]


def launcher_config(doc: dict) -> dict:
    """Ray's own preparation and validation of a cluster-launcher config, as `ray up` runs them before
    it calls any cloud (defaults merged, JSON schema, node-type rules); offline. Raises on a bad config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(doc))
    validate_config(prepared)
    return prepared


def cluster_problems(cfg: dict) -> list[str]:
    """What a prepared config lacks that MediSyn needs (Ray does not check these: it clamps a node
    type's min_workers above its max_workers silently, and resources left empty are looked up from
    the cloud at launch)."""
    found = list(exposures(cfg))
    types = cfg["available_node_types"]
    for name, t in types.items():
        if "CPU" not in t.get("resources", {}):
            found.append(f"{name}: resources must be explicit (at least CPU)")
        if t["min_workers"] > t["max_workers"]:
            found.append(f"{name}: min_workers {t['min_workers']} above max_workers {t['max_workers']}")
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    if not any(t["resources"].get("CPU", 0) and not t["resources"].get("GPU") for t in workers.values()):
        found.append("no CPU worker type")
    if not any(t["resources"].get("GPU", 0) >= 8 and t["max_workers"] > 0 for t in workers.values()):
        found.append("no GPU worker type with 8 GPUs a node")
    if sum(t["max_workers"] for t in workers.values()) > cfg["max_workers"]:
        found.append("max_workers is below the worker types' maxima")
    mounts = {str(k).rstrip("/"): str(v) for k, v in cfg.get("file_mounts", {}).items()}
    if not any(k.endswith("/.ray/auth_token") and v.endswith(".ray/auth_token") for k, v in mounts.items()):
        found.append("the token file (~/.ray/auth_token) is not mounted on every node")
    start = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    if len(start) < 2 or not all("RAY_AUTH_MODE=token" in c for c in start):
        found.append("a `ray start` runs without RAY_AUTH_MODE=token")
    if not any(
        "medisyn.submit publish-cluster" in c and "RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"]
    ):
        found.append("the head does not publish the worker types (the resource pre-flight's autoscaling maximum)")
    if not any("pip install" in c and "medisyn" in c for c in cfg["setup_commands"]):
        found.append("setup_commands do not install the package")
    run_root = ((cfg.get("metadata") or {}).get("medisyn") or {}).get("run_root", "")
    if not (run_root.startswith(("s3://", "gs://")) or run_root.startswith("/")):
        found.append(f"metadata.medisyn.run_root must be a shared URI or absolute path, not {run_root!r}")
    return found


def shipped_cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_the_shipped_cluster_passes_rays_validation_and_ours():
    cfg = launcher_config(shipped_cluster())
    assert cluster_problems(cfg) == []
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 8 and types["cpu_worker"]["resources"]["CPU"] > 0


def test_ray_rejects_an_unknown_key_and_min_workers_above_the_maximum():
    import jsonschema

    doc = shipped_cluster()
    doc["max_worker"] = 4  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        launcher_config(doc)
    doc = shipped_cluster()
    doc["available_node_types"]["gpu_worker"]["node_confg"] = {}  # unknown key inside a node type
    with pytest.raises(jsonschema.ValidationError, match="node_confg"):
        launcher_config(doc)
    doc = shipped_cluster()
    doc["available_node_types"]["cpu_worker"]["min_workers"] = doc["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        launcher_config(doc)


def test_our_checks_catch_what_ray_lets_through():
    doc = shipped_cluster()
    doc["available_node_types"]["gpu_worker"]["min_workers"] = 9  # above its own max_workers (8): Ray clamps
    doc["available_node_types"]["cpu_worker"]["resources"] = {}
    doc["file_mounts"].pop("/home/ubuntu/.ray/auth_token")
    doc["worker_start_ray_commands"] = [
        c.replace("export RAY_AUTH_MODE=token; ", "") for c in doc["worker_start_ray_commands"]
    ]
    doc["metadata"]["medisyn"]["run_root"] = "runs"
    doc["head_start_ray_commands"] = [c for c in doc["head_start_ray_commands"] if "publish-cluster" not in c]
    assert cluster_problems(launcher_config(doc)) == [
        "cpu_worker: resources must be explicit (at least CPU)",
        "gpu_worker: min_workers 9 above max_workers 8",
        "no CPU worker type",
        "the token file (~/.ray/auth_token) is not mounted on every node",
        "a `ray start` runs without RAY_AUTH_MODE=token",
        "the head does not publish the worker types (the resource pre-flight's autoscaling maximum)",
        "metadata.medisyn.run_root must be a shared URI or absolute path, not 'runs'",
    ]


def test_an_exposed_dashboard_fails_the_whole_check():
    doc = shipped_cluster()
    doc["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in doc["head_start_ray_commands"]]
    assert cluster_problems(launcher_config(doc)) == [
        "--dashboard-host binds every interface: --dashboard-host=0.0.0.0"
    ]


# The RayJob CRD's fields, from KubeRay v1.7.0: ray-operator/config/crd/bases/ray.io_rayjobs.yaml
# (openAPIV3Schema: spec, spec.rayClusterSpec, its headGroupSpec and workerGroupSpecs items) and the
# submission modes of ray-operator/apis/ray/v1/rayjob_types.go (JobSubmissionMode). Pod templates are
# Kubernetes' own PodTemplateSpec and are not listed here.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
    "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType",
    "template",
}  # fmt: skip
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
AUTH_OPTIONS = {"enableK8sTokenAuth", "mode", "secretName"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def rayjob_problems(doc: dict) -> list[str]:
    """Fields the CRD does not have, and the checks KubeRay's validation (utils/validation.go) and
    ours make on the values."""
    found = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("ray.io/v1", "RayJob"):
        found.append("not a ray.io/v1 RayJob")
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", {})
    levels = [("spec", spec, RAYJOB_SPEC), ("rayClusterSpec", cluster, RAYCLUSTER_SPEC)]
    levels.append(("headGroupSpec", cluster.get("headGroupSpec", {}), HEAD_GROUP))
    levels.append(("authOptions", cluster.get("authOptions", {}), AUTH_OPTIONS))
    levels += [(f"workerGroupSpecs[{i}]", g, WORKER_GROUP) for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    for where, data, known in levels:
        found += [f"{where}.{k}: not a field of the CRD" for k in sorted(set(data) - known)]
    if spec.get("submissionMode") not in SUBMISSION_MODES:
        found.append(f"submissionMode {spec.get('submissionMode')!r} is none of {sorted(SUBMISSION_MODES)}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        found.append("shutdownAfterJobFinishes is not true")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
        found.append("ttlSecondsAfterFinished must be a non-negative integer")
    if not isinstance(spec.get("activeDeadlineSeconds"), int) or spec["activeDeadlineSeconds"] <= 0:
        found.append("activeDeadlineSeconds must be a positive integer")
    if cluster.get("authOptions", {}).get("mode") != "token":
        found.append("authOptions.mode is not token")
    head = cluster.get("headGroupSpec", {})
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        found.append("the head's dashboard and job API face a network outside the Kubernetes cluster")
    for g in cluster.get("workerGroupSpecs", []):
        if missing := WORKER_GROUP_REQUIRED - set(g):
            found.append(f"worker group {g.get('groupName')}: missing {sorted(missing)}")
        elif not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
            found.append(f"worker group {g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return found


QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity (``220Gi``, ``64M``, ``1000``) in bytes."""
    s = str(q)
    for suffix in sorted(QUANTITY, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * QUANTITY[suffix])
    return int(s)


def shm_problems(cluster: dict) -> list[str]:
    """GPU pods whose object store would not live in /dev/shm: Ray puts the store in /dev/shm only when
    /dev/shm holds ``object-store-memory`` (services.py: else disk, or a refusal above 10 GB), and a
    pod's own /dev/shm is 64 MiB unless a memory-backed emptyDir is mounted there."""
    found = []
    for g in cluster.get("workerGroupSpecs", []):
        pod = g["template"]["spec"]
        container = pod["containers"][0]
        if not container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"):
            continue
        name = g["groupName"]
        store = int((g.get("rayStartParams") or {}).get("object-store-memory", 0))
        if not store:
            found.append(f"{name}: no object-store-memory in rayStartParams")
            continue
        mount = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
        volume = [v for v in pod.get("volumes", []) if mount and v.get("name") == mount[0]["name"]]
        empty = volume[0].get("emptyDir") if volume else None
        if not empty or empty.get("medium") != "Memory":
            found.append(f"{name}: /dev/shm is not a memory-backed emptyDir")
            continue
        size = quantity_bytes(empty.get("sizeLimit", 0))
        if not store <= size <= 1.25 * store:
            found.append(f"{name}: /dev/shm sizeLimit {size} bytes does not match object-store-memory {store}")
        if quantity_bytes(container["resources"]["limits"]["memory"]) < 2 * size:
            found.append(f"{name}: /dev/shm takes more than half the pod's memory limit")
    return found


def shipped_rayjob() -> dict:
    return yaml.safe_load((ROOT / "deploy/rayjob.yaml").read_text())


def test_the_rayjob_uses_only_documented_fields_and_runs_the_paper_pipeline():
    from medisyn.config import load_config

    doc = shipped_rayjob()
    assert rayjob_problems(doc) == []
    spec = doc["spec"]
    words = spec["entrypoint"].split()
    assert words[:4] == ["python", "jobs/pipeline.py", "--config", "jobs/configs/paper.yaml"]
    cfg = load_config(ROOT / words[3], words[4:])  # the overrides are valid keys and values
    assert cfg.run_dir == spec["metadata"]["run"] and cfg.run_dir.startswith("s3://")
    assert cfg.train.checkpoint_local_dir.startswith("/tmp/")  # paper.yaml's /mnt/nvme is not a pod user's to create
    assert spec["entrypointNumCpus"] == 1 and "entrypointNumGpus" not in spec
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["excludes"] == yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())["excludes"]
    gpu = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert shm_problems(spec["rayClusterSpec"]) == []
    assert int(gpu["rayStartParams"]["object-store-memory"]) == 200 * 2**30


def test_the_shm_check_catches_a_missing_or_mismatched_dev_shm():
    cluster = shipped_rayjob()["spec"]["rayClusterSpec"]
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-workers"][0]
    gpu["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = "64Gi"  # below the 200 GiB store
    assert shm_problems(cluster) == [
        f"gpu-workers: /dev/shm sizeLimit {64 * 2**30} bytes does not match object-store-memory {200 * 2**30}"
    ]
    del gpu["template"]["spec"]["volumes"][0]["emptyDir"]["medium"]  # a disk-backed emptyDir
    assert shm_problems(cluster) == ["gpu-workers: /dev/shm is not a memory-backed emptyDir"]
    gpu["template"]["spec"]["containers"][0]["volumeMounts"] = []
    assert shm_problems(cluster) == ["gpu-workers: /dev/shm is not a memory-backed emptyDir"]
    gpu["rayStartParams"] = {}
    assert shm_problems(cluster) == ["gpu-workers: no object-store-memory in rayStartParams"]
    assert quantity_bytes("220Gi") == 220 * 2**30 and quantity_bytes("64M") == 64 * 10**6


def test_the_rayjob_check_catches_unknown_fields_and_bad_values():
    doc = shipped_rayjob()
    spec = doc["spec"]
    spec["ttlSecondsAfterFinish"] = spec.pop("ttlSecondsAfterFinished")  # a typo
    spec["submissionMode"] = "JobMode"
    spec["activeDeadlineSeconds"] = 0
    spec["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    spec["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    assert rayjob_problems(doc) == [
        "spec.ttlSecondsAfterFinish: not a field of the CRD",
        "submissionMode 'JobMode' is none of ['HTTPMode', 'InteractiveMode', 'K8sJobMode', 'SidecarMode']",
        "ttlSecondsAfterFinished must be a non-negative integer",
        "activeDeadlineSeconds must be a positive integer",
        "the head's dashboard and job API face a network outside the Kubernetes cluster",
        "worker group cpu-workers: replicas outside [minReplicas, maxReplicas]",
    ]

"""The cluster definition users start from: nothing that accepts code faces a network."""

from __future__ import annotations

from pathlib import Path

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

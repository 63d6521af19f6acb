"""cluster.yaml is checked offline the way `ray up` checks it before it touches AWS.

`ray up` (``ray.autoscaler._private.commands._bootstrap_config``) runs ``prepare_config`` (merge with the AWS
defaults, docker and per-type min/max fill-ins), then asks AWS to fill in missing node resources, then
``validate_config`` (``ray-schema.json``, head type, sum of min_workers), then the AWS bootstrap (IAM, subnets,
security group). The two pure steps need no cloud access; the resource fill-in is not needed because every node
type declares its resources. These are private Ray helpers: pyproject.toml pins Ray for them.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
PRIVATE_PORTS = (6379, 8265, 10001)  # GCS, dashboard + job server, Ray Client
PUBLIC_CIDRS = ("0.0.0.0/0", "::/0")


def check_node_type_bounds(config: dict[str, Any]) -> None:
    """Project check: each node type's min_workers <= max_workers.

    Nothing `ray up` runs rejects this: ``validate_config`` only compares the sum of min_workers with the
    global max_workers. The v1 autoscaler then silently clamps to min(min_workers, max_workers), and the v2
    autoscaler fails an assert on the head when it loads the config. So the project checks it itself.
    """
    for name, node_type in config["available_node_types"].items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if lo > hi:
            raise ValueError(f"node type {name!r}: min_workers={lo} > max_workers={hi}")


def validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    """The offline part of `ray up`'s checks plus the project check; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    check_node_type_bounds(prepared)
    return prepared


def public_ingress(rules: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """The EC2 ingress rules (IpPermissions) that open ``port`` to the whole internet."""
    found = []
    for rule in rules:
        all_ports = str(rule.get("IpProtocol", "tcp")) == "-1"
        covers = all_ports or rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535)
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if covers and any(c in PUBLIC_CIDRS for c in cidrs):
            found.append(rule)
    return found


@pytest.fixture()
def cluster() -> dict[str, Any]:
    """A fresh parse of the shipped cluster.yaml (tests may mutate it)."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_shipped_cluster_yaml_validates(cluster: dict[str, Any]) -> None:
    prepared = validate_like_ray_up(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    "path, typo",
    [
        ((), "max_wokers"),  # top level
        (("available_node_types", "ray.worker.gpu"), "min_wokers"),  # inside a node type
        (("docker",), "run_option"),
        (("auth",), "ssh_usr"),
    ],
)
def test_misspelt_key_is_rejected(cluster: dict[str, Any], path: tuple[str, ...], typo: str) -> None:
    section = cluster
    for key in path:
        section = section[key]
    section[typo] = 1
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_like_ray_up(cluster)


def test_node_type_with_min_above_max_is_rejected(cluster: dict[str, Any]) -> None:
    worker = cluster["available_node_types"]["ray.worker.gpu"]
    worker["min_workers"], worker["max_workers"] = 3, 2  # sum of min_workers stays under the global max
    with pytest.raises(ValueError, match="min_workers=3 > max_workers=2"):
        validate_like_ray_up(cluster)


def test_min_workers_above_global_max_is_rejected_by_ray(cluster: dict[str, Any]) -> None:
    cluster["available_node_types"]["ray.worker.gpu"]["min_workers"] = cluster["max_workers"] + 1
    with pytest.raises(ValueError, match="global `max_workers` is smaller"):
        validate_config(prepare_config(cluster))


def test_head_has_no_gpu_and_no_cpu_for_work_and_workers_have_a_gpu(cluster: dict[str, Any]) -> None:
    prepared = validate_like_ray_up(cluster)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "the head should not take worker actors or trials"
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, name
        assert t["resources"].get("CPU", 0) >= 1, name  # a worker actor asks for 1 CPU as well
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, f"{name} should autoscale from zero"


def test_no_ingress_rule_opens_ray_ports_to_the_internet(cluster: dict[str, Any]) -> None:
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    for port in PRIVATE_PORTS:
        assert not public_ingress(rules, port), f"port {port} is open to the internet"


@pytest.mark.parametrize(
    "rule, opens_8265",
    [
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}, False),
        ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, False),
    ],
)
def test_public_ingress_check_finds_open_rules(rule: dict[str, Any], opens_8265: bool) -> None:
    assert bool(public_ingress([rule], 8265)) is opens_8265


def test_docker_image_tag_follows_project_version(cluster: dict[str, Any]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cluster["docker"]["image"].endswith(f":{version}-gpu"), "rebuild/retag the image for this version"

"""deploy/: every file parses, the cluster definitions carry the example config's islands, and each
island's expert group fits on one node of its kind (resources, CPUs, GPUs)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from common.config import RunConfig, resolve_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "islands.example.yaml"
METRICS = ["ray_ddm_images_seen", "ray_ddm_loss", "ray_ddm_images_per_second", "ray_ddm_eta_seconds",
           "ray_ddm_retries_total", "ray_ddm_job_images_seen"]
DRIVER_SLICE = 0.001  # what an unlabelled multi-worker group's driver actor holds of its island's resource


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def example() -> RunConfig:
    return resolve_config(config_file=str(EXAMPLE))


def _fits(island, resources: dict[str, float], cpus: float, gpus: float, where: str) -> None:
    """One expert's whole group (num_workers workers + the group driver's slice) fits on this node."""
    n = island.num_workers
    for key, per_worker in island.resources.items():
        need = per_worker * n + (DRIVER_SLICE if n > 1 and not island.label_selector else 0)
        assert resources.get(key, 0) >= need, f"{where}: {key} = {resources.get(key)} < {need} for {n} workers"
    assert cpus >= island.cpus_per_worker * n, f"{where}: {cpus} CPUs < {island.cpus_per_worker} x {n}"
    if island.use_gpu:
        assert gpus >= n, f"{where}: {gpus} GPUs < {n} workers"


def test_every_file_parses():
    seen = []
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in {".yaml", ".yml"}:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs and all(isinstance(d, dict) for d in docs), path
        elif path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        else:
            continue
        seen.append(path.relative_to(DEPLOY).as_posix())
    assert {"cluster.yaml", "runtime_env.yaml", "islands.example.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob.yaml", "grafana/ddm_dashboard.json"} <= set(seen)


def test_example_config_validates(example):
    assert {i.name for i in example.islands.pool} == {"h100x8", "a10g"}
    assert example.islands.simulate is False
    # Every island keeps the expert's effective batch (FLOP matching) by accumulation.
    for island in example.islands.pool:
        assert example.expert_batch % (island.per_worker_batch * island.num_workers) == 0


def test_cluster_launcher_yaml_is_valid_for_ray_and_carries_islands(example):
    from ray._private.label_utils import validate_node_label_syntax
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(DEPLOY / "cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's own schema + defaults, as `ray up` does
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    for node in types.values():
        validate_node_label_syntax(node.get("labels", {}))
    for island in example.islands.pool:
        matches = {name: t for name, t in types.items()
                   if all(k in t["resources"] for k in island.resources)
                   and all(t.get("labels", {}).get(k) == v for k, v in island.label_selector.items())}
        assert matches, f"no node type in cluster.yaml carries island {island.name}"
        for name, t in matches.items():
            res = t["resources"]
            _fits(island, res, res.get("CPU", 0), res.get("GPU", 0), f"cluster.yaml {name}")
            assert t.get("max_workers", 0) >= 1
    # Islands are disjoint: no node type carries two islands' resources.
    island_keys = {k for i in example.islands.pool for k in i.resources}
    for name, t in types.items():
        assert len(island_keys & set(t["resources"])) <= 1, name
    setup = " ".join(raw.get("setup_commands", []))
    assert "pip install -e ~/ddm-islands" in setup and raw["file_mounts"]["~/ddm-islands"] == "."


# Field names of the RayCluster CRD (ray.io/v1) in KubeRay 1.5 and later, from
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml: group-level `labels` and `resources` (maps
# of strings) arrived in 1.5.0, and the operator then rejects rayStartParams["labels"].
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
                     "serviceType", "template"}
WORKER_GROUP_FIELDS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                       "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
CLUSTER_FIELDS = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                  "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
                  "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
RAY_START_RESOURCE_PARAMS = {"num-cpus", "num-gpus", "memory", "resources"}


def _check_group_fields(group: dict, allowed: set[str], where: str) -> None:
    from ray._private.label_utils import validate_node_label_syntax

    assert set(group) <= allowed, f"{where}: fields unknown to the RayCluster CRD: {sorted(set(group) - allowed)}"
    params = group.get("rayStartParams", {})
    # KubeRay >= 1.5: "rayStartParams['labels'] is not supported ... use the top-level Labels field".
    assert "labels" not in params, f"{where}: labels belong in the group's top-level `labels`"
    # ... and resources in one place only ("should not be set in both rayStartParams and Resources").
    assert not (group.get("resources") and RAY_START_RESOURCE_PARAMS & set(params)), where
    assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
    for key in ("labels", "resources"):
        assert all(isinstance(v, str) for v in group.get(key, {}).values()), f"{where}: {key} values must be strings"
    validate_node_label_syntax(group.get("labels", {}))


def _check_kuberay_spec(spec: dict, example: RunConfig, where: str) -> dict[str, dict]:
    assert set(spec) <= CLUSTER_FIELDS, f"{where}: {sorted(set(spec) - CLUSTER_FIELDS)}"
    _check_group_fields(spec["headGroupSpec"], HEAD_GROUP_FIELDS, f"{where} head")
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for name, group in groups.items():
        _check_group_fields(group, WORKER_GROUP_FIELDS, f"{where} {name}")
        assert WORKER_GROUP_REQUIRED <= set(group), f"{where} {name}: missing {WORKER_GROUP_REQUIRED - set(group)}"
    for island in example.islands.pool:
        found = []
        for name, group in groups.items():
            resources = {k: float(v) for k, v in group.get("resources", {}).items()}
            labels = group.get("labels", {})
            if all(k in resources for k in island.resources) and \
                    all(labels.get(k) == v for k, v in island.label_selector.items()):
                container = group["template"]["spec"]["containers"][0]
                limits = container["resources"]["limits"]
                cpus = float(group["rayStartParams"].get("num-cpus", limits["cpu"]))
                _fits(island, resources, cpus, float(limits.get("nvidia.com/gpu", 0)), f"{where} {name}")
                assert group["maxReplicas"] >= max(group["minReplicas"], 1) and group["replicas"] <= group["maxReplicas"]
                found.append(name)
        assert found, f"no worker group in {where} carries island {island.name}"
    return groups


def test_kuberay_raycluster_and_rayjob_carry_islands(example):
    cluster = _load(DEPLOY / "kuberay" / "raycluster.yaml")
    job = _load(DEPLOY / "kuberay" / "rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    groups = _check_kuberay_spec(cluster["spec"], example, "raycluster.yaml")
    job_groups = _check_kuberay_spec(job["spec"]["rayClusterSpec"], example, "rayjob.yaml")
    # The RayJob's cluster is the RayCluster: same islands, same resources and limits.
    assert job_groups == groups
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"] == cluster["spec"]["headGroupSpec"]
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m orchestrator run --config deploy/islands.example.yaml"
    assert spec["submissionMode"] == "K8sJobMode"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/ddm-islands"
    assert "WORKDIR /home/ray/ddm-islands" in (DEPLOY / "Dockerfile").read_text()


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_runtime_env_matches_pyproject_without_torchvision():
    env = _load(DEPLOY / "runtime_env.yaml")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _names(env["pip"]["packages"]) == _names(deps) - {"ray"}  # Ray is the cluster's own
    assert env["working_dir"] == "."
    assert {"runs/", ".git/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string env vars
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the fields
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "torchvision" not in path.read_text().lower(), path


def test_lock_pins_every_dependency_portably():
    """The lock pins each runtime and test dependency exactly, names no local index or wheel folder, and
    pins the torch release CI tests (without a local build tag, so PyPI serves it anywhere)."""
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lock if "==" in line and not line.startswith((" ", "#")))
    pins = {re.split(r"[\[ ;]", name, maxsplit=1)[0].lower(): version.split(" ")[0] for name, version in pins.items()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["test"]) | {"boto3"}
    assert wanted <= set(pins), sorted(wanted - set(pins))
    assert pins["torch"] == "2.13.0"
    assert not [line for line in lock if line.startswith("-") or "file://" in line or "+cpu" in line]
    assert "pip install -r requirements.lock" in (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_installs_the_project():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    assert "pip install --no-deps ." in text and "COPY --chown=ray:users . ./" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", "runs"} <= set(ignored)


def test_grafana_dashboard_queries_every_metric_by_expert_and_island():
    dash = json.loads((DEPLOY / "grafana" / "ddm_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for metric in METRICS:
        assert any(metric in e for e in exprs), metric
        # The names the dashboard expects are the ones the workers set (Ray adds the ray_ prefix).
        assert f'"{metric.removeprefix("ray_")}"' in (ROOT / "worker" / "metrics.py").read_text()
    for e in exprs:
        assert set(re.findall(r"ray_ddm_\w+", e)) <= set(METRICS), e
        assert 'island=~"$island"' in e, e
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["island"]["query"]["query"] == "label_values(ray_ddm_images_seen, island)"
    assert "expert" in variables and variables["datasource"]["query"] == "prometheus"
    legends = {t.get("legendFormat") for p in dash["panels"] for t in p.get("targets", [])}
    assert "{{expert}}@{{island}}" in legends
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))

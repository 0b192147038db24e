"""Where jobs run: every YAML under cluster/ and ray_config.yaml parses and matches the schema it is read
with (Ray's runtime env, Ray's cluster-launcher schema, KubeRay field names), and cluster/local.sh starts a
real two-node Ray cluster that accepts `ray job submit --runtime-env ray_config.yaml`, then stops exactly
the processes it started."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.clusterlib import (REPO, RAY_CONFIG, cluster_processes, cluster_status, process_alive,
                              start_local_cluster, stop_local_cluster, submit_job)

CLUSTER_DIR = REPO / "cluster"
LAUNCHER_YAMLS = [CLUSTER_DIR / "aws-gpu.yaml", CLUSTER_DIR / "onprem.yaml"]
KUBERAY_YAMLS = [CLUSTER_DIR / "kuberay" / "raycluster.yaml", CLUSTER_DIR / "kuberay" / "rayjob.yaml"]
ALL_YAMLS = sorted(CLUSTER_DIR.rglob("*.yaml")) + [RAY_CONFIG]


def _load(path: Path) -> dict:
    with path.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), f"{path} is not a mapping"
    return doc


def test_every_shipped_yaml_is_listed_here_and_parses():
    # Every YAML under cluster/ is checked against its schema below only if it is listed here.
    assert set(ALL_YAMLS) - {RAY_CONFIG} <= set(LAUNCHER_YAMLS + KUBERAY_YAMLS)
    assert all(p.is_file() for p in LAUNCHER_YAMLS + KUBERAY_YAMLS)
    for path in ALL_YAMLS:
        _load(path)


def test_ray_config_is_a_valid_runtime_env_without_packages():
    from ray.runtime_env import RuntimeEnv

    doc = _load(RAY_CONFIG)
    env = RuntimeEnv(**doc)  # Ray's own validation: unknown fields and wrong types raise
    assert env.working_dir() == "."
    assert not {"pip", "uv", "conda"} & set(doc), "the cluster's python already holds the pinned deps"
    assert doc["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert all(isinstance(v, str) for v in doc["env_vars"].values())
    for heavy in ("/.venv/", "/.git/", "/runs/", "*.safetensors", "*.gguf"):
        assert heavy in doc["excludes"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    doc = _load(path)
    jsonschema.validate(doc, schema)
    head_cmds = " ".join(doc["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmds and "--dashboard-host=127.0.0.1" in head_cmds
    assert all("RAY_AUTH_MODE=token" in c for c in doc["worker_start_ray_commands"] if "ray start" in c)
    assert doc["head_node_type"] in doc["available_node_types"]


# KubeRay CRD field names (ray.io/v1, from the operator's Go types); the CRDs are not installed here.
_RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "authOptions",
                    "autoscalerOptions", "suspend", "headServiceAnnotations"}
_HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
_WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                 "numOfHosts", "idleTimeoutSeconds", "scaleStrategy", "suspend"}
_RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
                "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "submissionMode", "jobId",
                "metadata", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "suspend",
                "submitterPodTemplate", "submitterConfig"}


def _check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= _RAYCLUSTER_SPEC, set(spec) - _RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= _HEAD_GROUP
    assert spec["authOptions"] == {"mode": "token"}  # the job API listens on the pod IP: token auth guards it
    assert spec["rayVersion"] == "2.60.0"
    gpu_groups = 0
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= _WORKER_GROUP, set(group) - _WORKER_GROUP
        for c in group["template"]["spec"]["containers"]:
            gpu_groups += "nvidia.com/gpu" in c["resources"]["limits"]
    assert gpu_groups >= 1
    for c in [*spec["headGroupSpec"]["template"]["spec"]["containers"],
              *(c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])]:
        assert {"name", "image", "resources"} <= set(c)
        # every value a Kubernetes env entry carries must be a string
        assert all(isinstance(e.get("value", ""), str) for e in c.get("env", []))


def test_kuberay_raycluster_fields():
    doc = _load(KUBERAY_YAMLS[0])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_the_demo_with_the_same_runtime_env():
    doc = _load(KUBERAY_YAMLS[1])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert set(spec) <= _RAYJOB_SPEC, set(spec) - _RAYJOB_SPEC
    assert spec["entrypoint"] == "python -m minigpt run jobs/demo.yaml"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == _load(RAY_CONFIG)["env_vars"]
    _check_cluster_spec(spec["rayClusterSpec"])


# The job's driver checks, from inside the cluster, what a real minigpt job relies on: both nodes joined
# with their resources, and the working dir and env vars of ray_config.yaml reached a task on the worker node.
_PROBE = r"""
import json, os, ray
ray.init()

@ray.remote(num_cpus=1, resources={"minigpt_worker": 1})
def on_worker():
    return {"node": ray.get_runtime_context().get_node_id(), "files": sorted(os.listdir(".")),
            "offline": os.environ.get("HF_HUB_OFFLINE"), "auth": os.environ.get("RAY_AUTH_MODE")}

w = ray.get(on_worker.remote())
print("MINIGPT_PROBE " + json.dumps({
    "resources": ray.cluster_resources(),
    "alive_nodes": sum(n["Alive"] for n in ray.nodes()),
    "driver_node": ray.get_runtime_context().get_node_id(),
    "worker": w,
}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_local_cluster_runs_a_submitted_job_and_stops_cleanly(tmp_path):
    cluster = start_local_cluster(tmp_path / "ray-local", workers=1, cpus_per_node=1)
    procs: dict[int, str] = {}
    timings = {"start": cluster.start_seconds}
    try:
        nodes = cluster.nodes()
        assert [n[0] for n in nodes] == ["head", "worker1"]
        assert all(process_alive(pid, start) for _, pid, start in nodes)
        assert cluster_status(cluster).returncode == 0

        job = submit_job(cluster, ["python", "-c", _PROBE], timeout=120)
        timings["submit"] = job.seconds
        assert job.status == "SUCCEEDED", job.submit_output + job.logs
        line = next(ln for ln in job.logs.splitlines() if ln.startswith("MINIGPT_PROBE "))
        probe = json.loads(line.removeprefix("MINIGPT_PROBE "))
        res = probe["resources"]
        assert probe["alive_nodes"] == 2
        assert res["CPU"] == 2.0 and res["minigpt_head"] == 1.0 and res["minigpt_worker"] == 1.0
        worker = probe["worker"]
        assert worker["node"] != probe["driver_node"]          # the task ran on the other node
        assert "minigpt" in worker["files"] and "ray_config.yaml" in worker["files"]
        assert ".venv" not in worker["files"] and ".git" not in worker["files"]
        assert worker["offline"] == "1" and worker["auth"] == "token"

        procs = cluster_processes(cluster)
        assert len(procs) > 2 * len(nodes)  # GCS, raylets, dashboard, agents, workers...
    finally:
        t0 = time.monotonic()
        stop_local_cluster(cluster)
        timings["stop"] = time.monotonic() - t0
    assert cluster.nodes() == []
    assert cluster_status(cluster).returncode == 3
    survivors = [pid for pid, start in procs.items() if process_alive(pid, start)]
    assert survivors == [], survivors
    assert not list(Path("/tmp").glob(f"minigpt-ray.*/head/session_*_{nodes[0][1]}"))

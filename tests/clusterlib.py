"""Helpers for tests that need a real multi-node Ray cluster: start one with cluster/local.sh on free ports,
submit a job with the `ray job submit` CLI exactly as users do, read its status and logs, stop the cluster,
and check from /proc that no process it started survives.

Typical use (see tests/test_cluster.py):

    cluster = start_local_cluster(tmp_path / "ray-local", workers=1, cpus_per_node=1)
    try:
        job = submit_job(cluster, ["python", "-m", "minigpt", "run", "jobs/tiny.yaml"])
        assert job.status == "SUCCEEDED", job.logs
    finally:
        stop_local_cluster(cluster)
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
RAY_CONFIG = REPO / "ray_config.yaml"
VENV_BIN = REPO / ".venv" / "bin"


@dataclass(frozen=True)
class LocalCluster:
    """A cluster started by cluster/local.sh; `env` is what every command talking to it needs."""

    state_dir: Path
    gcs_port: int
    dashboard_port: int
    workers: int
    cpus_per_node: int
    env: dict[str, str] = field(repr=False)
    start_seconds: float = 0.0

    @property
    def address(self) -> str:
        """The RAY_ADDRESS for `ray job submit` (the dashboard's job API)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def nodes(self) -> list[tuple[str, int, str]]:
        """(name, leader pid, kernel start time) per node, as recorded by local.sh; [] once stopped."""
        path = self.state_dir / "nodes"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            name, pid, start, *_ = line.split()
            out.append((name, int(pid), start))
        return out


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str
    logs: str
    submit_output: str
    seconds: float


def cluster_env(state_dir: Path, ports: dict[str, int] | None = None) -> dict[str, str]:
    """Environment for local.sh and the ray CLI: the venv first on PATH, token auth, no inherited address."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["MINIGPT_CLUSTER_DIR"] = str(state_dir)
    for key, value in (ports or {}).items():
        env[key] = str(value)
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(workers: int) -> dict[str, int]:
    """Ports for local.sh that are free now: GCS, Ray Client, dashboard, and workers+1 consecutive
    dashboard-agent ports. Ephemeral ports (bind to 0) lie above Ray's worker range 10002-19999."""
    chosen: set[int] = set()

    def pick(run: int = 1) -> int:
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
            span = range(base, base + run)
            if base + run < 65000 and not chosen.intersection(span) and all(map(_port_free, span)):
                chosen.update(span)
                return base
        raise RuntimeError("no free port range found")

    return {"MINIGPT_RAY_PORT": pick(), "MINIGPT_RAY_CLIENT_PORT": pick(), "MINIGPT_DASHBOARD_PORT": pick(),
            "MINIGPT_AGENT_PORT": pick(workers + 1)}


def start_local_cluster(state_dir: Path, *, workers: int = 1, cpus_per_node: int = 1,
                        object_store_mb: int = 100, timeout: float = 120.0) -> LocalCluster:
    """Start head + `workers` worker nodes on free ports; raises with local.sh's output if it fails."""
    ports = free_ports(workers)
    env = cluster_env(state_dir, ports)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), "start", "--workers", str(workers), "--cpus-per-node", str(cpus_per_node),
         "--object-store-mb", str(object_store_mb)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cluster/local.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return LocalCluster(state_dir=state_dir, gcs_port=ports["MINIGPT_RAY_PORT"],
                        dashboard_port=ports["MINIGPT_DASHBOARD_PORT"], workers=workers,
                        cpus_per_node=cpus_per_node, env=env, start_seconds=time.monotonic() - t0)


def cluster_status(cluster: LocalCluster) -> subprocess.CompletedProcess:
    """`local.sh status`: returncode 0 all nodes up, 1 some, 3 none."""
    return subprocess.run(["bash", str(LOCAL_SH), "status"], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=30)


def stop_local_cluster(cluster: LocalCluster, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """`local.sh stop`; raises if it reports survivors."""
    proc = subprocess.run(["bash", str(LOCAL_SH), "stop"], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cluster/local.sh stop failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _ray(cluster: LocalCluster, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def submit_job(cluster: LocalCluster, entrypoint: list[str], *, runtime_env: Path = RAY_CONFIG,
               timeout: float = 600.0) -> JobResult:
    """`ray job submit --runtime-env ray_config.yaml -- ENTRYPOINT` from the repository root, waiting for
    the end; then the final status from `ray job status` and the full driver log from `ray job logs`."""
    job_id = f"minigpt-test-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    submitted = _ray(cluster, "job", "submit", "--address", cluster.address, "--submission-id", job_id,
                     "--runtime-env", str(runtime_env), "--", *entrypoint, timeout=timeout)
    seconds = time.monotonic() - t0
    status = _ray(cluster, "job", "status", "--address", cluster.address, job_id, timeout=60)
    logs = _ray(cluster, "job", "logs", "--address", cluster.address, job_id, timeout=60)
    return JobResult(job_id=job_id, status=_parse_status(status.stdout + status.stderr), logs=logs.stdout,
                     submit_output=submitted.stdout + submitted.stderr, seconds=seconds)


def _parse_status(text: str) -> str:
    # `ray job status` (ray 2.60) prints "Job '<id>' succeeded" / "failed" / "was stopped" for final states
    # and "Status for job '<id>': <STATUS>" otherwise.
    final = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
    m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
    if m:
        return final[m.group(1)]
    m = re.search(r"Status for job '[^']+': (\w+)", text)
    return m.group(1) if m else "UNKNOWN"


# --- process bookkeeping from /proc, independent of local.sh's own checks -----------------------------

def _proc_stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, ppid, session, starttime) of a pid, None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), fields[19]


def process_alive(pid: int, start: str) -> bool:
    """True when `pid` is still the same (non-zombie) process that started at `start`."""
    st = _proc_stat(pid)
    return st is not None and st[0] != "Z" and st[3] == start


def cluster_processes(cluster: LocalCluster) -> dict[int, str]:
    """Every live process of the cluster: the nodes' sessions plus all their descendants (job drivers
    run in sessions of their own), as pid -> start time."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[0] != "Z":
                table[int(entry.name)] = st
    sessions = {pid for _, pid, _ in cluster.nodes()}
    mine = {pid for pid, st in table.items() if st[2] in sessions}
    grew = True
    while grew:
        new = {pid for pid, st in table.items() if pid not in mine and st[1] in mine}
        mine |= new
        grew = bool(new)
    return {pid: table[pid][3] for pid in mine}

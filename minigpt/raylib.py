"""Connecting to Ray: an existing cluster when one is named, otherwise an embedded local Ray.

Ray 2.60 switches a machine into token-auth mode as soon as any `ray.init()` has written ~/.ray/auth_token,
after which clients without `RAY_AUTH_MODE=token` are refused. We therefore always set the mode explicitly,
before Ray is imported by anything that starts it.

What the driver prints (and so what `ray job logs` shows) is minigpt's progress lines, each once:

* Ray Train v2 patches `print` in its workers to log through the root logger *and*, because Ray has replaced the
  worker's sys.stdout, to print as well, so every line a training worker printed reached the driver twice.
  RAY_TRAIN_ENABLE_PRINT_PATCH=0 (here, in the embedded Ray's runtime env and in ray_config.yaml) turns that off.
* Worker output is forwarded to the driver only for lines that carry a stage tag (`[recover] …`, see
  PROGRESS_LINE); model-loading bars, DeepSpeed and Ray Train chatter stay in the worker logs
  (`/tmp/ray/session_latest/logs/worker-*.out|err`, the dashboard's Logs tab).
* The driver itself loads and saves models (slimming): its transformers progress bars are off and DeepSpeed's
  logger keeps errors only (quiet_driver), so the driver's own output is progress lines too.
"""

from __future__ import annotations

import logging
import os
import re

from minigpt.memory import report_peaks

AUTH_MODE = "token"
# Worker lines forwarded to the driver: minigpt's progress lines, "[stage] ..." with a lowercase tag (see
# filter_worker_logs). Framework lines start otherwise: DeepSpeed's with a timestamp, torch's with "[rank0]:".
PROGRESS_LINE = re.compile(r"^\[[a-z][a-z_-]*\] ")
WORKER_ENV = {
    "RAY_AUTH_MODE": AUTH_MODE,
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers and BLAS must not oversubscribe the cores a task reserved
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # each line a training worker prints reaches the driver once
}

os.environ.setdefault("RAY_AUTH_MODE", AUTH_MODE)
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train v2 drains worker reports once per poll (2 s by default), which throttles short recovery runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once. `address` None: RAY_ADDRESS if set (ray job submit sets it), else an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", AUTH_MODE)
    env_vars = {**WORKER_ENV, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        # Under `ray job submit` the job's runtime env (ray_config.yaml) already applies; passing another here
        # would replace its working_dir.
        ray.init(address=addr, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=_want_dashboard(), dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env_vars}, log_to_driver=True)
    filter_worker_logs()
    quiet_driver()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_driver() -> None:
    """No transformers progress bars and only DeepSpeed errors in this (the driver's) process. Called after Ray has
    started, so the workers of an embedded Ray, which inherit the driver's environment at start, keep theirs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # A filter, not a level: DeepSpeed resets its logger's level when it is first imported.
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in ds.filters):
        ds.addFilter(_ErrorsOnly())


def progress_lines(lines: list[str]) -> list[str]:
    """The lines of a batch of worker output that the driver prints: minigpt's progress lines."""
    return [line for line in lines if PROGRESS_LINE.match(line)]


def filter_worker_logs() -> bool:
    """Make the driver print only the progress lines of worker output (each without Ray's "(pid=…)" prefix).

    Ray offers no public hook for this, so the driver's log handler (ray._private, Ray 2.60) is swapped for one
    that filters first. If that internal API is missing, Ray's own forwarding stays (more chatter, nothing lost)
    and False is returned.
    """
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return False

    def forward(data: dict) -> None:
        lines = progress_lines(data.get("lines") or [])
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward)
    return True


def _want_dashboard() -> bool:
    # The dashboard costs a few seconds and a port; tests turn it off with MINIGPT_DASHBOARD=0.
    return os.environ.get("MINIGPT_DASHBOARD", "1") != "0"


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def print_actor_peaks(what: str, actors: list) -> None:
    """Print the measured peak RSS of actors that have a `peak_rss_mib` method (calibration workers, sequential
    runners), before they are killed; one that cannot answer (it died, and said why) is left out."""
    import ray

    try:
        print(report_peaks(what, ray.get([a.peak_rss_mib.remote() for a in actors], timeout=30)), flush=True)
    except Exception:  # noqa: BLE001 - the figure is a report; killing the actors goes on regardless
        pass


def largest_node_memory() -> float:
    """Bytes of Ray's `memory` resource on the largest live node (what its tasks and actors may use), 0 if unknown."""
    import ray

    return max((float(n.get("Resources", {}).get("memory", 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0)

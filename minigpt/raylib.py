"""Connecting to Ray: an existing cluster when one is named, otherwise an embedded local Ray.

Ray 2.60 switches a machine into token-auth mode as soon as any `ray.init()` has written ~/.ray/auth_token,
after which clients without `RAY_AUTH_MODE=token` are refused. We therefore always set the mode explicitly,
before Ray is imported by anything that starts it.
"""

from __future__ import annotations

import os

AUTH_MODE = "token"

os.environ.setdefault("RAY_AUTH_MODE", AUTH_MODE)
# Ray Train v2 drains worker reports once per poll (2 s by default), which throttles short recovery runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once. `address` None: RAY_ADDRESS if set (ray job submit sets it), else an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", AUTH_MODE)
    # Workers inherit these through the runtime env so tokenizers and BLAS do not oversubscribe the cores.
    env_vars = {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "TOKENIZERS_PARALLELISM": "false"}
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        # Under `ray job submit` the job's runtime env (ray_config.yaml) already applies; passing another here
        # would replace its working_dir.
        ray.init(address=addr, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=_want_dashboard(), dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env_vars}, log_to_driver=True)


def _want_dashboard() -> bool:
    # The dashboard costs a few seconds and a port; tests turn it off with MINIGPT_DASHBOARD=0.
    return os.environ.get("MINIGPT_DASHBOARD", "1") != "0"


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))

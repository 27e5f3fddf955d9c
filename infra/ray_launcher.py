"""Connect to Ray: the cluster in RAY_ADDRESS (or the one `ray job submit` runs us on), or a
local Ray started in-process when there is none.

The AWS_* variables of the driver travel to the workers as job-level runtime_env
env_vars, since a cluster's workers were started with the environment of `ray start`,
not ours.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_FORWARDED_PREFIXES = ("AWS_",)
# Ray's runtime_env_agent.log records a runtime_env's env_vars in clear text on every node.
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def forwarded_env(*, secrets: bool = True) -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(_FORWARDED_PREFIXES) and (secrets or k not in SECRET_VARS)}


def ensure_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Initialise Ray once; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        runtime_env = {"env_vars": forwarded_env()}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            log.info("connecting to Ray at %s", address)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            log.info("starting a local Ray")
            # Its workers inherit this process's environment: secrets need not (and must
            # not, see SECRET_VARS) travel in the runtime_env.
            runtime_env = {"env_vars": forwarded_env(secrets=False)}
            # address="local": never attach to some other Ray that happens to run on this host.
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=runtime_env,
                     include_dashboard=False, log_to_driver=True)
    return ray.cluster_resources()

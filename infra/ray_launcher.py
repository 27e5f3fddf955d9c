"""Connect to Ray: the cluster in RAY_ADDRESS (or the one `ray job submit` runs us on), or a
local Ray started in-process when there is none.

The AWS_* variables of the driver travel to the workers as job-level runtime_env
env_vars, since a cluster's workers were started with the environment of `ray start`,
not ours.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

_FORWARDED_PREFIXES = ("AWS_",)
# Ray's runtime_env_agent.log records a runtime_env's env_vars in clear text on every node.
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def forwarded_env(*, secrets: bool = True) -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(_FORWARDED_PREFIXES) and (secrets or k not in SECRET_VARS)}


def verbose() -> bool:
    """Ray and Ray Data speak at INFO, and workers' output reaches the driver, only when this
    project's own loggers are at DEBUG (the CLI's -v)."""
    return logging.getLogger("sparse_embed").isEnabledFor(logging.DEBUG)


def ensure_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Initialise Ray once; returns the cluster's resources."""
    import ray

    loud = verbose()
    if not ray.is_initialized():
        # logging_level: the driver's "ray" logger ("Started a local Ray instance" is INFO).
        verbosity = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}
        if not loud:
            # Ray's C++ core worker in this process logs to stderr; at default verbosity only
            # fatal lines. Its error lines there are not the user's to act on (every Ray Data
            # actor pool logs one about constructor arguments and max_restarts, ray#53727);
            # failures reach the user as exceptions. Read when ray.init starts the core worker.
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        runtime_env = {"env_vars": forwarded_env()}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            log.info("connecting to Ray at %s", address)
            ray.init(address=address, runtime_env=runtime_env, **verbosity)
        else:
            log.info("starting a local Ray")
            if not loud:
                # Ray turns token authentication on for a new local cluster and warns about it
                # on every run: nothing to act on (-v shows it). Setting RAY_AUTH_MODE here
                # instead would come too late: Ray reads it when it is imported.
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            # Its workers inherit this process's environment: secrets need not (and must
            # not, see SECRET_VARS) travel in the runtime_env.
            runtime_env = {"env_vars": forwarded_env(secrets=False)}
            # address="local": never attach to some other Ray that happens to run on this host.
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=runtime_env,
                     include_dashboard=False, **verbosity)
    if "ray.data" in sys.modules:  # configured when imported: callers import it before ensure_ray
        # Ray Data's console handler prints plans, progress and sink summaries at INFO;
        # its file handler (ray-data.log in the session's logs) keeps them all.
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.INFO if loud else logging.WARNING)
    return ray.cluster_resources()

"""Shared fixtures: a real S3 server on loopback (weed mini) and a real local Ray.

The store is session-scoped (~2 s to start), Ray module-scoped (~5 s). The store's
AWS_* settings go into os.environ before Ray starts, so Ray's workers inherit them.
"""
from __future__ import annotations

import os
import uuid

import pytest

from sparse_embed.infra.object_store import LocalObjectStore


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    store = LocalObjectStore(data_dir=str(tmp_path_factory.mktemp("s3"))).start()
    saved = {k: os.environ.get(k) for k in store.aws_env()}
    os.environ.update(store.aws_env())
    yield store
    store.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(object_store):
    """A fresh bucket per test: s3://<name>."""
    return object_store.create_bucket(f"t-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def ray_local(object_store):
    """A local Ray with 2 CPUs whose workers see the object store's AWS_* settings
    (module-scoped, so a module may start a cluster of its own instead)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local": a fresh instance, never another engineer's cluster on this host. The
    # secret stays out of the runtime_env (Ray logs its env_vars); workers inherit os.environ.
    env = {k: v for k, v in object_store.aws_env().items() if k != "AWS_SECRET_ACCESS_KEY"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


"""The embed job on real Ray clusters: a multi-node cluster with logical GPUs, and a head
started with `ray start --head` that receives the job through `ray job submit`."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import SPEC
from sparse_embed.infra.object_store import free_ports
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed

pytestmark = pytest.mark.integration



def _fill(bucket: str, n: int, seed: int) -> tuple[str, list[str]]:
    source = f"{bucket}/images/"
    images = generate(n, seed=seed, variants=("jpeg",), min_side=64, max_side=128)
    return source, storage.put_many(source, {im.key: im.data for im in images})


def test_multi_node_cluster_with_logical_gpus_gets_one_actor_per_gpu(object_store, bucket):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": object_store.aws_env()})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address, runtime_env={"env_vars": object_store.aws_env()})
        source, uris = _fill(bucket, 8, seed=3)
        result = run_embed(EmbedConfig(source=source, out=f"{bucket}/out", spec=SPEC, embed_batch_size=4, build_index=False))
        pool = result["actor_pool"]
        assert {k: pool[k] for k in ("size", "num_gpus", "num_cpus", "decode_cpus")} == {"size": 2, "num_gpus": 1, "num_cpus": 1, "decode_cpus": 1.0}
        assert pool["decode"] == "cpu", "the default --decode cpu decodes in CPU tasks"
        emb = live.read_live(tables.table_uri(f"{bucket}/out", tables.EMBEDDINGS), ["uri"])
        assert sorted(emb.column("uri").to_pylist()) == sorted(uris)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_head(tmp_path, object_store):
    """`ray start --head --block` on loopback with token auth, in its own process group."""
    gcs, dashboard, client, *worker_ports = free_ports(8)
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, **object_store.aws_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # unix socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True, timeout=60)
        if ok.returncode == 0:
            break
        assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        time.sleep(2)
    else:
        pytest.fail("ray head did not answer: " + (tmp_path / "head.log").read_text()[-3000:])
    yield address, env, ray_bin
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # > 40 s on 2 cores; ./dev test -m slow
def test_ray_job_submit_runs_the_embed_job(ray_head, bucket):
    address, env, ray_bin = ray_head
    source, uris = _fill(bucket, 6, seed=4)
    out = f"{bucket}/submitted"
    for _ in range(10):  # the head answers `job list` a little before its job agent takes submissions
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--",
             sys.executable, "-m", "sparse_embed.jobs.cli", "embed", source, "--out", out, "--model", "resnet10t", "--index-shards", "2"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        if "No available agent to submit job" not in job.stdout + job.stderr:
            break
        time.sleep(3)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr)
    emb = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), ["uri"])
    assert sorted(emb.column("uri").to_pylist()) == sorted(uris)
    manifest_id = storage.read_bytes(f"{out}/index/CURRENT").decode()
    manifest = json.loads(storage.read_bytes(f"{out}/index/{manifest_id}/manifest.json"))
    assert manifest["ntotal"] == len(uris)
    assert env["AWS_SECRET_ACCESS_KEY"] not in job.stdout + job.stderr

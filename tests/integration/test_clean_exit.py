"""Commands end cleanly: exit 0, and nothing on stderr that is not the user's to act on
(Ray's actor-restart error line, its token-authentication warning) or that comes after the
last line of output (a native thread aborting at interpreter exit: `terminate called
without an active exception`, exit 134). Local source and output; the CLI in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import SPEC
from sparse_embed.infra.synthetic_images import generate

pytestmark = pytest.mark.integration

SEARCHES = 20  # README, "Tests": `search` runs this many times in the default suite


def _cli(*argv, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return subprocess.run([sys.executable, "-m", "sparse_embed.jobs.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A local output embedded (with its index) by the CLI, which exited cleanly."""
    root = tmp_path_factory.mktemp("clean-exit")
    src, out = root / "images", root / "out"
    for im in generate(6, seed=61, variants=("jpeg",), min_side=32, max_side=48):
        path = src / im.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(im.data)
    embed = _cli("embed", f"{src}/", "--out", str(out), "--model", SPEC["model"], "--index-shards", "1")
    assert embed.returncode == 0, embed.stderr[-2000:]
    for noise in ("core_worker", "max_restarts", "Token authentication", "terminate called"):
        assert noise not in embed.stderr, f"{noise!r} on stderr:\n{embed.stderr[-2000:]}"
    return out


def test_search_exits_cleanly_every_time(embedded):
    for i in range(SEARCHES):
        r = _cli("search", "--index", str(embedded / "index"), "--image-id", "3", "-k", "5")
        assert r.returncode == 0 and r.stderr == "", f"run {i}: exit {r.returncode}, stderr {r.stderr[-500:]!r}"
        assert len(r.stdout.splitlines()) == 6  # the query line and five results


def test_serve_stops_cleanly_on_sigterm(embedded):
    import signal

    import requests

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "serve", "--index", str(embedded / "index"),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving index "), first + proc.stderr.read()
        assert requests.get(first.split(" at ")[1].split()[0] + "api/status", timeout=60).json()["ntotal"] == 12
        proc.send_signal(signal.SIGTERM)  # what a service manager sends to stop it
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out == "stopped (SIGTERM)\n", (proc.returncode, out, err)
    assert all(" INFO sparse_embed." in line for line in err.splitlines()), f"stderr beyond our own log lines: {err!r}"

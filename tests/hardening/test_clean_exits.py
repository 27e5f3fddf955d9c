"""Every command exits cleanly, run after run: exit 0, its own last line last, and none of
the lines a user cannot act on (a native thread aborting at interpreter exit, `terminate
called without an active exception` with exit 134; Ray's core_worker line about an actor's
`max_restarts`; its token-authentication warning; a traceback). Each command runs
CLEAN_EXIT_RUNS times (default 20) and `search` CLEAN_EXIT_SEARCHES times (default 100) as
subprocesses on small local inputs. Slow (about 35 min here): `pytest -m slow
tests/hardening/test_clean_exits.py`; the default suite keeps tests/integration/test_clean_exit.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from helpers import SPEC
from sparse_embed.infra.synthetic_images import generate

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]  # 20 demos take ~20 min

RUNS = int(os.environ.get("CLEAN_EXIT_RUNS", "20"))
SEARCHES = int(os.environ.get("CLEAN_EXIT_SEARCHES", "100"))
NOISE = ("terminate called", "core_worker", "max_restarts", "Token authentication", "Traceback", "Aborted")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


def _cli(*argv, env=None) -> tuple[int, list[str]]:
    """(exit code, stdout and stderr as one stream of lines)."""
    r = subprocess.run([sys.executable, "-m", "sparse_embed.jobs.cli", *argv], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=env or _env(), timeout=900)
    return r.returncode, r.stdout.splitlines()


def _assert_clean(i: int, rc: int, lines: list[str], last: str) -> None:
    text = "\n".join(lines[-30:])
    assert rc == 0, f"run {i}: exit {rc}:\n{text}"
    assert not [n for n in NOISE if any(n in ln for ln in lines)], f"run {i}: noise in the output:\n{text}"
    assert lines and lines[-1].startswith(last), f"run {i}: the last line is not the command's own:\n{text}"
    print(f"[clean-exits] run {i}: exit 0, clean", flush=True)  # progress under -s


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A local source of 12 images and an output embedded from it (with its index)."""
    root = tmp_path_factory.mktemp("clean-exits")
    src = root / "images"
    for im in generate(6, seed=71, variants=("jpeg",), min_side=32, max_side=48):
        (src / im.key).parent.mkdir(parents=True, exist_ok=True)
        (src / im.key).write_bytes(im.data)
    rc, lines = _cli("embed", f"{src}/", "--out", str(root / "out"), "--model", SPEC["model"], "--index-shards", "1")
    _assert_clean(0, rc, lines, "tables ")
    return root


def test_embed(output):
    for i in range(RUNS):  # each into a new output: listing, diff, actors, write and index every time
        rc, lines = _cli("embed", f"{output / 'images'}/", "--out", str(output / f"embed-{i}"), "--model", SPEC["model"],
                         "--index-shards", "1")
        _assert_clean(i, rc, lines, "tables ")


def test_index_build(output):
    for i in range(RUNS):
        rc, lines = _cli("index", "build", "--table", str(output / "out" / "embeddings"), "--out",
                         str(output / "built" / "index"), "--shards", "1")
        _assert_clean(i, rc, lines, "index ")


def test_search(output):
    for i in range(SEARCHES):
        rc, lines = _cli("search", "--index", str(output / "out" / "index"), "--image-id", "3", "-k", "5")
        _assert_clean(i, rc, lines, "  ")
        assert len(lines) == 6, lines  # the query line and five results


def test_serve_stops_cleanly_on_sigint_and_sigterm(output):
    for i in range(RUNS):
        proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "serve", "--index",
                                 str(output / "out" / "index"), "--port", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env())
        head = []
        try:
            for line in proc.stdout:  # our INFO log lines, then the address
                head.append(line.rstrip("\n"))
                if line.startswith("serving index "):
                    break
            assert head and head[-1].startswith("serving index "), head
            url = head[-1].split(" at ")[1].split()[0]
            assert requests.get(url + "api/status", timeout=60).json()["ntotal"] == 12
            proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
            rest = proc.communicate(timeout=60)[0].splitlines()
        finally:
            if proc.poll() is None:
                proc.kill()
        _assert_clean(i, proc.returncode, [*head, *rest], "stopped (SIG")


def test_demo(tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}  # the demo starts its own store
    for i in range(RUNS):
        rc, lines = _cli("demo", "--images", "2", "--model", SPEC["model"], "--corrupt", "1", "--contact-sheet",
                         str(tmp_path / f"sheet-{i}.png"), env=env)
        _assert_clean(i, rc, lines, "[demo] ")

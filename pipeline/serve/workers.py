"""`serve --workers N`: N server processes on one port (SO_REUSEPORT: the kernel spreads
new connections over them), each with its own event loop, thread pools and query encoder,
all over the same memory-mapped index files, so the index sits once in the page cache
whatever N is. This process only supervises: it starts the workers, prints one address,
forwards SIGINT/SIGTERM, and stops them all when one of them dies (the service manager
restarts the whole server)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

START_TIMEOUT_S = 600.0  # a worker loads the index (streamed from S3 the first time) before it answers


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_serving_line(proc: subprocess.Popen) -> str:
    """The worker's "serving index ..." line (lines before it are echoed); '' if it exited first."""
    for line in proc.stdout:
        if line.startswith("serving index "):
            return line.rstrip("\n")
        print(line, end="", flush=True)
    return ""


def _drain(proc: subprocess.Popen) -> None:
    for _ in proc.stdout:  # the worker's last line ("stopped ...") is this process's to print
        pass


def run_workers(child_argv: list[str], n: int) -> int:
    """Start `n` copies of `sparse-embed serve` with `child_argv` (which names a fixed port and
    --reuse-port); return 0 after a clean stop by signal, 1 if a worker failed."""
    stop = {"by": None}
    procs = [subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "serve", *child_argv],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]

    def forward(signum, _frame):
        stop["by"] = stop["by"] or signal.Signals(signum).name
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lines = [_first_serving_line(p) for p in procs]
        if not all(lines) and stop["by"] is not None:  # stopped while starting
            for p in procs:
                p.wait()
            print(f"stopped ({stop['by']})", flush=True)
            return 0
        if not all(lines):
            failed = next(p for p, line in zip(procs, lines) if not line)
            forward(signal.SIGTERM, None)
            print(f"a worker exited with code {failed.wait()} before serving; see its message above", file=sys.stderr)
            return 1
        for p in procs:
            threading.Thread(target=_drain, args=(p,), daemon=True).start()
        print(f"{lines[0].split('  (')[0]} with {n} workers (pids {', '.join(str(p.pid) for p in procs)})  "
              f"(Ctrl-C stops it)", flush=True)
        while stop["by"] is None and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        if stop["by"] is None:  # a worker died: take the others down too
            dead = next(p for p in procs if p.poll() is not None)
            forward(signal.SIGTERM, None)
            for p in procs:
                p.wait()
            print(f"worker {dead.pid} exited with code {dead.returncode}: stopped the others", file=sys.stderr)
            return 1
        codes = [p.wait() for p in procs]
        print(f"stopped ({stop['by']})", flush=True)
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()

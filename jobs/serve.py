"""`sparse-embed serve --index OUT/index [--host 127.0.0.1] [--port 8080]`: the search page and
its JSON API, over the index CURRENT points to (picked up again when CURRENT moves)."""
from __future__ import annotations

import argparse

from .options import non_negative_float, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index root URI (holds CURRENT), e.g. s3://bucket/emb/index")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only); any other address needs "
                        "--token-file")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a name clients use to reach the server (the Host header must be one of them, or the --host "
                        "name, or 127.0.0.1/localhost on loopback); repeatable; needed with --host 0.0.0.0")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="a file holding a token (16+ characters) every API request must carry: open the page once "
                        "as /?token=TOKEN, or send 'Authorization: Bearer TOKEN'; required beyond loopback")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=positive_int, default=20, help="largest uploaded query image in MiB (default 20)")
    p.add_argument("--max-k", type=positive_int, default=200, help="most results one search may ask for (default 200)")
    p.add_argument("--max-object-mb", type=positive_float, default=64.0, metavar="MB",
                   help="a thumbnail reads at most this much of an indexed object; larger ones answer 422 (default 64)")
    p.add_argument("--max-megapixels", type=positive_float, default=40.0, metavar="MP",
                   help="largest image a thumbnail or an upload decodes to (default 40: 120 MB of RGB)")
    p.add_argument("--decode-queue", type=int, default=16, metavar="N",
                   help="requests waiting to decode beyond the 4 running; more answer 503 with Retry-After (default 16)")
    p.add_argument("--thumb-cache-mb", type=positive_int, default=1024, metavar="MB",
                   help="thumbnails kept on disk, keyed by object URI and ETag (default 1024)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="server processes on the port, over one memory-mapped index (default 1)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # internal: a worker of --workers
    p.add_argument("--check-every", type=non_negative_float, default=2.0, metavar="SECONDS",
                   help="read CURRENT at most this often and load a new index when it moves (default 2)")


def start_background(index: str, *, host: str = "127.0.0.1", port: int = 0, check_every: float = 2.0,
                     max_upload_mb: int = 20, max_k: int = 200):
    """The server on a background thread (demo --serve, benchmarks); -> (BackgroundServer, LiveIndex)."""
    from sparse_embed.pipeline.serve.app import build_app
    from sparse_embed.pipeline.serve.live_index import LiveIndex
    from sparse_embed.pipeline.serve.runner import BackgroundServer

    live = LiveIndex(index, check_every_s=check_every)
    live.load()
    server = BackgroundServer(build_app(live, max_k=max_k, max_upload_bytes=max_upload_mb * 2 ** 20), host, port)
    server.start()
    return server, live


def run(args) -> int:
    import asyncio

    from sparse_embed.pipeline.serve.access import AccessPolicy, is_loopback, read_token_file
    from sparse_embed.pipeline.serve.app import build_app
    from sparse_embed.pipeline.serve.decode_slots import DEFAULT_RUNNING, DecodeSlots
    from sparse_embed.pipeline.serve.live_index import LiveIndex
    from sparse_embed.pipeline.serve.runner import serve_forever
    from sparse_embed.pipeline.store.storage import check_readable

    if not 0 <= args.port <= 65535:
        raise ValueError(f"Expected --port from 0 to 65535, got {args.port}")
    if args.decode_queue < 0:
        raise ValueError(f"Expected --decode-queue of 0 or more, got {args.decode_queue}")
    token = read_token_file(args.token_file) if args.token_file else None
    access = AccessPolicy.for_listener(args.host, allowed_hosts=args.allowed_host, token=token)
    check_readable(args.index, role="--index")  # credentials and bucket, named before the index is read
    if args.workers > 1:
        return _run_workers(args)
    live = LiveIndex(args.index, check_every_s=args.check_every)
    loaded = live.load()
    app = build_app(live, max_k=args.max_k, max_upload_bytes=args.max_upload_mb * 2 ** 20,
                    max_object_bytes=int(args.max_object_mb * 2 ** 20), max_pixels=int(args.max_megapixels * 1e6),
                    thumb_cache_bytes=args.thumb_cache_mb * 2 ** 20, access=access,
                    decodes=DecodeSlots(DEFAULT_RUNNING, args.decode_queue))
    if not is_loopback(args.host):
        print(f"listening on {args.host}: requests need the token and one of the names "
              f"{', '.join(sorted(access.hosts))}", flush=True)

    def ready(url: str) -> None:
        print(f"serving index {loaded.index_id} ({loaded.index.ntotal} vectors) at {url}  (Ctrl-C stops it)", flush=True)

    stopped_by = asyncio.run(serve_forever(app, args.host, args.port, on_ready=ready, reuse_port=args.reuse_port))
    print(f"stopped ({stopped_by})", flush=True)
    return 0


def _run_workers(args) -> int:
    """`--workers N`: this process supervises N single-worker servers on one port (workers.py)."""
    from sparse_embed.pipeline.serve.workers import free_port, run_workers

    port = args.port or free_port(args.host)
    child = ["--index", args.index, "--host", args.host, "--port", str(port), "--reuse-port",
             "--max-upload-mb", str(args.max_upload_mb), "--max-k", str(args.max_k),
             "--max-object-mb", str(args.max_object_mb), "--max-megapixels", str(args.max_megapixels),
             "--decode-queue", str(args.decode_queue), "--thumb-cache-mb", str(args.thumb_cache_mb),
             "--check-every", str(args.check_every)]
    for name in args.allowed_host:
        child += ["--allowed-host", name]
    if args.token_file:
        child += ["--token-file", args.token_file]
    return run_workers(child, args.workers)

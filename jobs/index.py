"""`sparse-embed index build|update --table OUT/embeddings --out OUT/index`."""
from __future__ import annotations

import argparse

from .options import add_lock_arguments, non_negative_float, positive_int, recall_target


def memory_size(text: str) -> int:
    from sparse_embed.pipeline.index.plan import parse_bytes

    try:
        return parse_bytes(text, option="a size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="embeddings table URI, e.g. s3://bucket/emb/embeddings")
    p.add_argument("--out", required=True, help="index root URI (holds CURRENT), e.g. s3://bucket/emb/index")
    p.add_argument("--version", type=int, default=None, help="table version to index (default: latest)")
    p.add_argument("--shards", type=positive_int, default=None,
                   help="parallel build slices, one Ray task each (default: one per CPU, at most one per table file)")
    p.add_argument("--target-recall", type=recall_target, default=0.95,
                   help="recall@10 against exact search that tuning picks nprobe/efSearch for (default 0.95)")
    add_lock_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparse_embed.pipeline.index.plan import LAYOUTS

    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="plan, train, fill (parallel Ray tasks), tune and publish an index from a table version",
                       description="Plan an index within --memory-budget (flat, IVF, IVF-HNSW with SQ8/PQ/OPQ codes), train it "
                                   "on a sample, add table slices in parallel Ray tasks, merge or keep shards, tune nprobe "
                                   "for --target-recall against exact search, and move CURRENT to it.")
    _common(b)
    b.add_argument("--memory-budget", type=memory_size, default="16GB",
                   help="memory of one serving node for the index, e.g. 16GB, 512MiB (default 16GB); decides the index type")
    b.add_argument("--nlist", type=positive_int, default=None, help="IVF list count (default: from the faiss guidelines)")
    b.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="merged: one index file (merged on disk in a task); shards: one file per slice; auto: merged "
                        "for IVF within one node's --memory-budget, shards for flat and beyond one node")
    b.add_argument("--serving-nodes", type=positive_int, default=1,
                   help="serving nodes of --memory-budget each that the index may be spread over as shards (default 1)")
    b.add_argument("--accept-lower-recall", action="store_true",
                   help="build even when the planner expects the budget's codes to miss --target-recall "
                        "(without it such a plan stops before building, naming the budget that would reach it)")
    u = sub.add_parser("update", help="bring the CURRENT index up to a table version: add new, remove deleted, or rebuild",
                       description="Add new and changed vectors and remove deleted ones relative to the index CURRENT points "
                                   "to; rebuild instead when the table grew past --rebuild-growth, the model changed, or "
                                   "recall fell below --target-recall. Publishes a new index id; CURRENT moves last.")
    _common(u)
    u.add_argument("--memory-budget", type=memory_size, default=None,
                   help="memory budget for a rebuild (default: the one the current index was planned with)")
    u.add_argument("--rebuild-growth", type=non_negative_float, default=0.5,
                   help="rebuild once the table exceeds (1 + this) x the vectors the index was trained on (default 0.5)")
    u.add_argument("--force-rebuild", action="store_true", help="rebuild from scratch even when an update would do")


def run(args) -> int:
    import uuid

    from sparse_embed.pipeline.store.lock import lock_root_of_index, output_lock

    owner = f"index-{args.index_command}-{uuid.uuid4().hex[:8]}"
    with output_lock(lock_root_of_index(args.out), owner=owner, wait_s=args.wait):
        manifest = _build_or_update(args)
    if not manifest["ntotal"]:
        print(f"index {manifest['index_id']}: table v{manifest['table_version']} is empty: published an empty index")
        return 0
    how = manifest.get("update") and f"updated from {manifest['update']['parent']}" or manifest["build"].get("rebuild_reason") or "built"
    print(f"index {manifest['index_id']} ({how}): {manifest['ntotal']} vectors, {manifest['factory']}, dim {manifest['dim']}, "
          f"{len(manifest['shards'])} file(s), table v{manifest['table_version']}, recall@10 {manifest['recall_at_10']:.4f}"
          f"{_recall_detail(manifest)}, search {manifest['search_params'] or 'exact'}")
    return 0


def _recall_detail(manifest: dict) -> str:
    """' (held-out; self 0.9700)' for a build that recorded both figures, else ''."""
    r = manifest.get("recall") or {}
    if r.get("self") is None or manifest.get("update"):
        return ""
    return f" ({'held-out' if r.get('held_out_kind', '').startswith('table rows held') else r.get('held_out_kind')}; self {r['self']:.4f})"


def _build_or_update(args) -> dict | None:
    if args.index_command == "update":
        from sparse_embed.pipeline.index.update import UpdateConfig, update_index

        return update_index(UpdateConfig(args.table, args.out, version=args.version, memory_budget=args.memory_budget,
                                         target_recall=args.target_recall, rebuild_growth=args.rebuild_growth,
                                         force_rebuild=args.force_rebuild, shards=args.shards))
    from sparse_embed.pipeline.index.build import BuildConfig, build_index

    return build_index(BuildConfig(args.table, args.out, shards=args.shards, version=args.version,
                                   memory_budget=args.memory_budget, nlist=args.nlist, layout=args.layout,
                                   target_recall=args.target_recall, accept_lower_recall=args.accept_lower_recall,
                                   serving_nodes=args.serving_nodes))

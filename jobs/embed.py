"""`sparse-embed embed SOURCE --out OUT --model NAME`: the main job."""
from __future__ import annotations

import argparse

from sparse_embed.pipeline.store.tables import ROWS_PER_FILE

from sparse_embed.pipeline.embed.decode import ALLOWED_FORMATS
from sparse_embed.pipeline.embed.deletion_guard import DEFAULT_LIMIT

from .options import (add_encoder_arguments, add_lock_arguments, encoder_spec, fraction, non_negative_float, pillow_formats,
                      positive_float, positive_int)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="image prefix: s3://bucket/prefix/ or a local directory")
    p.add_argument("--out", required=True, help="output prefix (s3:// or local): gets embeddings/, errors/, image_ids/, index/, runs/")
    add_encoder_arguments(p)
    g = p.add_argument_group("job")
    g.add_argument("--ext", dest="extensions", default=".jpg,.jpeg,.png,.webp,.bmp,.gif,.tif,.tiff",
                   help="comma-separated file extensions to include (default: common image types)")
    g.add_argument("--glob", default=None, help="only keys whose name (or full key) matches this glob, e.g. '*_large.jpg'")
    g.add_argument("--inventory", default=None, metavar="MANIFEST",
                   help="s3://.../manifest.json of an S3 Inventory report (CSV or Parquet) of SOURCE's bucket: read as the "
                        "listing instead of listing SOURCE (the --ext and --glob filters still apply)")
    g.add_argument("--decode-batch-size", type=positive_int, default=32, help="objects fetched and decoded per CPU task batch (default 32)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass on an embed actor (default 32)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder on each embed actor (compiled when the actor starts; fails the run there if it cannot)")
    g.add_argument("--rows-per-file", type=positive_int, default=ROWS_PER_FILE,
                   help=f"rows per Parquet file the run writes (default {ROWS_PER_FILE}); a killed run keeps every finished file")
    g.add_argument("--actors", type=positive_int, default=None, help="embed actors (default: one per GPU; one single-threaded actor per CPU on a CPU-only cluster)")
    g.add_argument("--actor-cpus", type=positive_float, default=None, help="CPUs per embed actor (default: 1 with GPUs; without, up to 0.75, leaving room for a decode task)")
    g.add_argument("--decode", choices=("cpu", "device", "auto"), default="cpu",
                   help="where images are decoded: cpu (decode tasks; default), device (the embed actors decode JPEGs with "
                        "torchvision's batched decoder, nvJPEG on a GPU; other formats fall back to the CPU decoder there), "
                        "auto (device when the actors get GPUs)")
    g.add_argument("--actor-wait", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="on an autoscaling cluster, wait up to this long for the GPUs and CPUs the embed actors need "
                        "(default 0: plan on the nodes that are up and fail at once if the plan cannot run)")
    g.add_argument("--max-pixels", type=positive_int, default=178_956_970,
                   help="decoded-size guard against decompression bombs (default 178956970, Pillow's own)")
    g.add_argument("--max-object-mb", type=positive_float, default=256.0, metavar="MB",
                   help="objects larger than this (by the listing's size, or by the bytes read) become fetch:TooLarge "
                        "error rows and are never read whole (default 256)")
    g.add_argument("--formats", type=pillow_formats, default=ALLOWED_FORMATS, metavar="NAMES",
                   help=f"comma-separated Pillow formats to decode, any case (default {','.join(ALLOWED_FORMATS)}); "
                        "an image in another format becomes an UnsupportedFormat error row naming it. "
                        "EPS/PS is refused: Pillow decodes it by running Ghostscript. "
                        "Objects are listed by --ext first, so a new format may need its extension there too")
    g.add_argument("--max-error-rate", type=fraction, default=1.0,
                   help="exit 1 when the failed fraction of objects tried for the first time exceeds this (default 1.0: never)")
    g.add_argument("--max-attempts", type=positive_int, default=3,
                   help="failures at one ETag before an object is no longer retried (default 3)")
    g.add_argument("--allow-empty-source", action="store_true",
                   help="run even when SOURCE lists no matching object: every row of the table is then deleted "
                        "(without it, an empty SOURCE is an error, so a wrong prefix never empties the table)")
    g.add_argument("--max-delete", default=DEFAULT_LIMIT, metavar="LIMIT",
                   help="stop with exit 2, changing nothing, when more embedded objects than this are missing from the "
                        "listing: a share of the table's rows (10%%, 0.1) or a count (500) (default %(default)s); a "
                        "shrunken listing (a missing mount, a wrong inventory prefix) then never empties the table")
    g.add_argument("--allow-mass-delete", action="store_true",
                   help="remove the rows of missing objects whatever their number (a deliberate purge)")
    add_lock_arguments(g)
    g.add_argument("--deletion-vectors", action="store_true",
                   help="a new embeddings table removes changed and deleted rows with Delta deletion vectors instead of "
                        "rewriting their files (for big tables; readers without deletion-vector support then refuse "
                        "the table). An existing table is upgraded with `sparse-embed enable-deletion-vectors`")
    g.add_argument("--no-index", dest="build_index", action="store_false", help="skip the final index build stage")
    g.add_argument("--index-shards", type=positive_int, default=None, help="index shards (default: one per CPU, at most one per table file)")


def run(args) -> int:
    from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
    from sparse_embed.pipeline.embed.report import summary

    cfg = EmbedConfig(
        source=args.source, out=args.out, spec=encoder_spec(args),
        extensions=tuple(e.strip() if e.strip().startswith(".") else "." + e.strip() for e in args.extensions.split(",") if e.strip()),
        glob=args.glob, decode_batch_size=args.decode_batch_size, embed_batch_size=args.batch_size, rows_per_file=args.rows_per_file, compile=args.compile,
        actors=args.actors, actor_cpus=args.actor_cpus, decode=args.decode, actor_wait_s=args.actor_wait, max_pixels=args.max_pixels, max_object_mb=args.max_object_mb, formats=tuple(args.formats),
        max_error_rate=args.max_error_rate, max_attempts=args.max_attempts, build_index=args.build_index, index_shards=args.index_shards,
        lock_wait_s=args.wait, inventory=args.inventory, deletion_vectors=args.deletion_vectors,
        max_delete=args.max_delete, allow_mass_delete=args.allow_mass_delete, allow_empty_source=args.allow_empty_source,
    )
    check_inputs(cfg, allow_empty=args.allow_empty_source)
    result = run_embed(cfg)
    print(summary(result), end="")
    return outcome(result, cfg.max_error_rate, prog="sparse-embed embed", option="--max-error-rate")


def outcome(result: dict, max_error_rate: float, *, prog: str, option: str) -> int:
    """Exit code of a finished run: 1 when infrastructure failures left objects to retry, or
    when the error rate of first tries exceeds `max_error_rate`; else 0."""
    import sys

    c = result["counts"]
    if c.get("failed_infrastructure"):
        kinds = sorted(c["failed_infrastructure_by_reason"])
        print(f"{prog}: {c['failed_infrastructure']} objects failed for infrastructure reasons ({', '.join(kinds)}): "
              f"they are not given up; fix the cause and rerun", file=sys.stderr)
        return 1
    if result["error_rate"] > max_error_rate:
        print(f"{prog}: error rate {result['error_rate']:.2%} exceeds {option} {max_error_rate:.2%}", file=sys.stderr)
        return 1
    return 0



def check_inputs(cfg, *, allow_empty: bool = False) -> None:
    """Before any work (and before Ray starts): the encoder name, then SOURCE holds matching
    objects, then OUT takes a write. Each failure is one line naming the cause and the fix."""
    import timm

    from sparse_embed.encoders import EncoderSpec, create_encoder
    from sparse_embed.pipeline.embed.listing import check_source
    from sparse_embed.pipeline.store.storage import check_writable

    if not timm.is_model(cfg.spec["model"]):
        create_encoder(EncoderSpec.from_dict(cfg.spec))  # checks the name first: raises the ValueError naming close ones
    check_source(cfg.source, cfg.extensions, cfg.glob, allow_empty=allow_empty)
    if cfg.inventory:
        from sparse_embed.pipeline.embed.inventory import read_manifest

        read_manifest(cfg.inventory)
    check_writable(cfg.out, role="--out")

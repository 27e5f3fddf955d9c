"""The embed job: recover -> list -> diff -> fetch+decode -> embed -> write -> (promote) -> index.

Every listed object ends as exactly one live row of `embeddings` or one row of `errors`:
1. files an earlier, killed run wrote but never committed are committed (recover);
2. rows whose (uri, etag) no longer matches the listing are removed (one commit, by the
   table's mechanism: copy-on-write or deletion vectors; store/removal.py), and so are
   the error rows of objects embedded, changed or deleted since;
3. objects not yet embedded at their current etag are processed; the sink commits them
   (one commit per table);
4. the error rows the retried objects had before this run are deleted. Until then a
   retried object that failed again has two rows; the diff counts the higher attempts,
   so a crash never loses an attempt.
A crash between any two commits leaves a state the next run completes.

Model versions never mix: the first run's encoder becomes the active one (<out>/encoder.json).
A run with another model_version fills the staging root <out>/embeddings/_staged/<version>/
instead (resumable like any run). When that run completes, promotion makes its files the
active embeddings table's in one commit that only names them (no row is read or copied:
they already sit inside that table's directory, which Delta readers and vacuum do not
list because of the "_"), copies the staged error rows, and the new index is built. Older
table versions stay readable by time travel; until promotion the old table and index
stay as they were.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sparse_embed.pipeline.embed import listing, report
from sparse_embed.pipeline.store import storage, tables
from sparse_embed.pipeline.store.lock import check_before_commit
from sparse_embed.pipeline.store.vacuum import vacuum_table
from sparse_embed.pipeline.embed.deletion_guard import DEFAULT_LIMIT, DeleteLimit
from sparse_embed.pipeline.embed.timing import StageTimer

log = logging.getLogger(__name__)

EMBED_STAGE = "fetch+decode+embed+write"  # its seconds give the report's throughput and busy fraction


@dataclass
class EmbedConfig:
    source: str
    out: str
    spec: dict  # encoders.EncoderSpec.to_dict()
    extensions: tuple[str, ...] = listing.DEFAULT_EXTENSIONS
    glob: str | None = None
    decode_batch_size: int = 32  # objects fetched concurrently by one decode task
    embed_batch_size: int = 32  # images per forward pass
    compile: bool = False  # torch.compile the encoder on each actor (compiled at actor start)
    rows_per_file: int = tables.ROWS_PER_FILE  # rows per Parquet file the write tasks put (at most one smaller file per write task)
    actors: int | None = None  # None: one per GPU, else one
    actor_cpus: float | None = None  # None: 1 with GPUs; up to CPU_ACTOR_SHARE without (plan_actors)
    decode: str = "cpu"  # "cpu": decode tasks; "device": the actors decode JPEGs on their device; "auto": device with GPUs
    actor_wait_s: float = 0.0  # wait this long for an autoscaling cluster to hold the actors' GPUs/CPUs (--actor-wait)
    max_pixels: int = 178_956_970
    max_object_mb: float = 256.0  # objects larger than this become fetch:TooLarge error rows, never read
    formats: tuple[str, ...] | None = None  # Pillow formats decoded (--formats); None: decode.ALLOWED_FORMATS. Not in model_version
    max_error_rate: float = 1.0  # failed / processed above this makes the run fail (exit 1)
    max_attempts: int = 3  # failures at one etag before an object is no longer retried
    parallel_listing: bool = True  # Ray tasks list key ranges (S3) or first-level directories (local)
    inventory: str | None = None  # an S3 Inventory manifest.json to read as the listing instead of listing SOURCE
    build_index: bool = True
    max_delete: str = DEFAULT_LIMIT  # deletion_guard.DeleteLimit: rows of vanished objects a run may remove
    allow_mass_delete: bool = False  # remove them whatever their number (a deliberate purge)
    allow_empty_source: bool = False  # a listing of nothing empties the table instead of failing
    deletion_vectors: bool = False  # a new embeddings table removes rows with deletion vectors (store/removal.py)
    index_shards: int | None = None
    lock_ttl_s: float = 600.0  # a dead run's output lock expires this long after its last heartbeat
    lock_wait_s: float = 0.0  # wait this long for another run's lock before failing with LockHeld
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6])

    def __post_init__(self):
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"Expected --max-error-rate in [0, 1], got {self.max_error_rate!r}")
        for name in ("decode_batch_size", "embed_batch_size", "rows_per_file", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected {name} >= 1, got {getattr(self, name)!r}")
        if self.decode not in ("cpu", "device", "auto"):
            raise ValueError(f"Expected --decode cpu, device or auto, got {self.decode!r}")
        DeleteLimit.parse(self.max_delete)
        if self.max_object_mb <= 0:
            raise ValueError(f"Expected --max-object-mb > 0, got {self.max_object_mb!r}")
        if self.actor_wait_s < 0:
            raise ValueError(f"Expected --actor-wait >= 0, got {self.actor_wait_s!r}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"Expected --actors >= 1, got {self.actors!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.run_id) or ".." in self.run_id:
            raise ValueError(f"Expected run_id of letters, digits, '.', '_', '-' (it names files under OUT/runs), got {self.run_id!r}")


# The pool plan and its checks live in actor_plan.py; re-exported for the callers and tests here.
from sparse_embed.pipeline.embed.actor_plan import (CPU_ACTOR_SHARE, DECODE_TASK_CPUS,  # noqa: E402,F401
                                                    plan_actors, plan_when_ready)


STAGED_DIR = "_staged"  # under <out>/embeddings: each model change's staging root


def staging_root(out: str, model_version: str) -> str:
    """<out>/embeddings/_staged/<model_version>: the run state of a model change (its
    tables, markers and encoder.json). Inside the active table's directory, so that
    promotion can add the staged files to it by relative path."""
    return storage.join(tables.table_uri(out, tables.EMBEDDINGS), STAGED_DIR, model_version)


def active_model_version(out: str) -> str | None:
    try:
        return report.read_encoder_spec(out)["model_version"]
    except FileNotFoundError:
        return None


def choose_data_root(out: str, enc) -> str:
    """Where this run's embeddings/errors go: <out> for the active model (or the first
    run), staging_root(out, version) for a different one."""
    active = active_model_version(out)
    if active is None:
        report.write_encoder_spec(out, enc)
        return out
    if active == enc.model_version:
        return out
    root = staging_root(out, enc.model_version)
    report.write_encoder_spec(root, enc)
    log.info("model_version %s differs from the active %s: staging into %s", enc.model_version, active, root)
    return root


def promote(out: str, root: str, enc) -> dict:
    """Make the staged tables the active ones, then the staged encoder, then drop the
    staging root's state. embeddings: one overwrite commit whose add actions name the
    staged files where they are (metadata only); errors (few rows): the staged rows copied
    in one overwrite. Safe to repeat after a crash: until encoder.json names the new
    version, the next run stages nothing new and promotes the same files again. Returns the
    new table versions."""
    import pyarrow as pa

    from sparse_embed.pipeline.embed.sink import STATS_COLUMNS

    emb_uri = tables.table_uri(out, tables.EMBEDDINGS)
    if root != staging_root(out, enc.model_version):
        raise ValueError(f"Expected the staging root of {enc.model_version} under {out}, got {root!r}")
    rel = f"{STAGED_DIR}/{enc.model_version}/{tables.EMBEDDINGS}/"  # the staged table's folder, relative to emb_uri
    staged_files = tables.file_actions(tables.table_uri(root, tables.EMBEDDINGS), prefix=rel, columns=STATS_COLUMNS)
    schema = tables.embeddings_schema(enc.dim)
    versions = {tables.EMBEDDINGS: tables.commit_files(emb_uri, staged_files, schema, mode="overwrite")}
    errors = tables.open_table(tables.table_uri(root, tables.ERRORS))
    err_schema = tables.errors_schema()
    data = errors.to_pyarrow_dataset().to_batches() if errors is not None else []
    reader = pa.RecordBatchReader.from_batches(err_schema, (b.cast(err_schema) for b in data))
    versions[tables.ERRORS] = tables.overwrite(tables.table_uri(out, tables.ERRORS), reader, err_schema)
    report.write_encoder_spec(out, enc)
    _drop_staging_state(root)
    return versions


def _drop_staging_state(root: str) -> None:
    """Everything under a promoted staging root but the embeddings data files, which the
    active table now names: its encoder.json, markers, errors table and the staged
    embeddings table's log."""
    check_before_commit(root)
    fs = storage.filesystem(root)
    base = storage.strip_scheme(root)
    keep = storage.strip_scheme(tables.table_uri(root, tables.EMBEDDINGS))
    for path in fs.ls(base, detail=False):
        path = path.rstrip("/")
        if path != keep:
            fs.rm(path, recursive=True)
    try:
        fs.rm(f"{keep}/_delta_log", recursive=True)
    except FileNotFoundError:
        pass


def choose_removal(root: str, dim: int, *, deletion_vectors: bool) -> None:
    """With `deletion_vectors`, create root's embeddings table with them; an existing
    copy-on-write table is not upgraded behind the user's back (it cannot be undone)."""
    from sparse_embed.pipeline.store import delta_log

    if not deletion_vectors:
        return
    uri = tables.table_uri(root, tables.EMBEDDINGS)
    dt = tables.open_table(uri)
    if dt is None:
        tables.ensure_table(uri, tables.embeddings_schema(dim))
        delta_log.enable_deletion_vectors(uri)
    elif not delta_log.uses_deletion_vectors(dt):
        raise ValueError(f"--deletion-vectors: {uri} already removes rows copy-on-write; upgrade it with "
                         f"`sparse-embed enable-deletion-vectors --out OUT` (cannot be undone), or drop the option")


def _embed_todo(cfg: EmbedConfig, todo, root: str, enc, timer: StageTimer) -> tuple[int, dict, dict, dict]:
    """Run Ray Data over `todo`; returns (rows embedded, actor pool, forward-pass seconds by
    actor, the write tasks' tally of failures: sink.tally_failures).
    The stage's progress counts the rows leaving the embed actors (on a RowCounter), and at
    the end the rows the sink committed."""
    import ray

    from sparse_embed.infra.ray_launcher import ensure_ray

    from sparse_embed.pipeline.embed.progress import RowCounter
    from sparse_embed.pipeline.embed.sink import EmbeddingTableSink

    with timer.stage("ray"):
        resources = ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage shows its own (progress.py); False also drops the per-operator bars
    ctx.enable_operator_progress_bars = False
    # Ray Data then logs a warning once that says how to turn its bars back on.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # A run with fewer blocks than actors (a small incremental run) gets a UserWarning that
    # some actors will idle: true, and nothing to act on.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    # Checked before any object is fetched: a plan Ray cannot place would wait forever.
    pool = plan_when_ready(lambda: resources if not cfg.actor_wait_s else ray.cluster_resources(), actors=cfg.actors,
                           actor_cpus=cfg.actor_cpus, decode=cfg.decode, precision=enc.spec.precision,
                           wait_s=cfg.actor_wait_s)
    sink = EmbeddingTableSink(root, run_id=cfg.run_id, dim=enc.dim, rows_per_file=cfg.rows_per_file)
    counter = RowCounter()
    try:
        with timer.stage(EMBED_STAGE, unit="images", total=todo.num_rows, poll=counter.rows) as progress:
            _write_embeddings(cfg, todo, enc, pool, sink, counter.handle)
            progress.update(sum(sink.result.rows.values()))
    finally:
        counter.close()
    return sink.result.rows.get(tables.EMBEDDINGS, 0), pool, sink.result.embed_seconds, sink.result.failures


def _write_embeddings(cfg: EmbedConfig, todo, enc, pool: dict, sink, counter) -> None:
    """fetch+decode tasks -> embed actors (which add each batch's rows to `counter`) -> `sink`."""
    import ray

    from sparse_embed.pipeline.embed.decode import ALLOWED_FORMATS, check_formats, fetch_decode_batch
    from sparse_embed.pipeline.embed.decode_device import fetch_batch
    from sparse_embed.pipeline.embed.actor import EmbedActor
    from sparse_embed.pipeline.embed.progress import CountRows

    from sparse_embed.pipeline.embed.todo_source import block_rows_for, read_todo

    # Read tasks stream the todo files as blocks of about one decode batch (todo_source.py).
    ds = read_todo(todo, block_rows=block_rows_for(todo.num_rows, cfg.decode_batch_size, pool["size"]),
                   num_cpus=pool["decode_cpus"])
    on_device = pool.get("decode") == "device"
    max_bytes = int(cfg.max_object_mb * 2**20)
    if on_device:  # the tasks only fetch; the actors decode (decode_device.py)
        ds = ds.map_batches(fetch_batch, batch_format="pyarrow", batch_size=cfg.decode_batch_size,
                            num_cpus=pool["decode_cpus"], fn_kwargs={"max_bytes": max_bytes})
    else:
        ds = ds.map_batches(fetch_decode_batch, batch_format="pyarrow", batch_size=cfg.decode_batch_size,
                            num_cpus=pool["decode_cpus"], fn_kwargs={"data_config": enc.data_config, "max_pixels": cfg.max_pixels,
                                                                      "formats": cfg.formats, "max_bytes": max_bytes})
    ds = ds.map_batches(
        CountRows, batch_format="pyarrow", batch_size=cfg.embed_batch_size,
        fn_constructor_kwargs={"inner": EmbedActor, "counter": counter, "inner_kwargs": {
            "spec": cfg.spec, "expected_version": enc.model_version,
            "cpu_threads": None if pool["num_gpus"] else max(1, int(pool["num_cpus"])),
            "compile_batch": cfg.embed_batch_size if cfg.compile else None,
            "decode": "device" if on_device else "cpu",
            "decode_options": {"max_pixels": cfg.max_pixels, "formats": check_formats(cfg.formats or ALLOWED_FORMATS)}}},
        compute=ray.data.ActorPoolStrategy(size=pool["size"]),
        num_gpus=pool["num_gpus"], num_cpus=pool["num_cpus"],
    )
    ds.write_datasink(sink, ray_remote_args={"num_cpus": pool["decode_cpus"]})
    if log.isEnabledFor(logging.DEBUG):  # -v: Ray Data's per-operator wall, CPU and block figures
        log.debug("Ray Data stats of the embed stage:\n%s", ds.stats())


def _table_versions(root: str) -> dict:
    return {t: tables.version_of(tables.table_uri(root, t)) for t in (tables.EMBEDDINGS, tables.ERRORS)}


def _diff_and_clear(cfg: EmbedConfig, root: str, enc, listed):
    """The diff of `listed` against root's tables, in Ray tasks over hash(uri) buckets
    (todo.py); the deletion guard; removes the stale embedding rows (one commit; a
    deletion-vector table compacts when due), deletes the error rows about to be retried
    and commits the new image_ids. Returns the todo.TodoParts."""
    from sparse_embed.pipeline.embed.todo import Guard, build_todo

    if not listed.num_rows and not cfg.allow_empty_source:
        raise FileNotFoundError(f"No images to embed: the {_listing_from(cfg)} holds no object under SOURCE {cfg.source!r} "
                                f"matching the filters: check SOURCE{' and --inventory' if cfg.inventory else ''} "
                                f"(or --allow-empty-source to empty the table on purpose)")
    guard = Guard(DeleteLimit.parse(cfg.max_delete), cfg.allow_mass_delete or (cfg.allow_empty_source and not listed.num_rows),
                  _listing_from(cfg), cfg.source)
    return build_todo(out=cfg.out, root=root, listed=listed, run_id=cfg.run_id, model_version=enc.model_version,
                      max_attempts=cfg.max_attempts, dim=enc.dim, guard=guard)


def _listing_from(cfg: EmbedConfig) -> str:
    """Where the run's listing came from, for the guard's messages and the report."""
    if cfg.inventory:
        return f"inventory {cfg.inventory}"
    return "parallel listing" if cfg.parallel_listing else "listing"


def _update_index(cfg: EmbedConfig, timer: StageTimer) -> str | None:
    """Adds and removes the difference on the current index; rebuilds when there is none,
    the model changed, or the table outgrew the plan (pipeline/index/update.py). Returns
    the index_id (None for an empty table)."""
    from sparse_embed.pipeline.index.update import UpdateConfig, update_index

    with timer.stage("index", unit="vectors") as progress:
        manifest = update_index(UpdateConfig(tables.table_uri(cfg.out, tables.EMBEDDINGS), report.index_root(cfg.out),
                                shards=cfg.index_shards))
        if manifest:
            progress.update(manifest["ntotal"])
    return manifest["index_id"] if manifest else None


def run_embed(cfg: EmbedConfig) -> dict:
    """Run the job under the output lock; returns the run report (also written to
    <out>/runs/). Raises LockHeld when another run holds the lock (after cfg.lock_wait_s),
    LockLost when this run loses it (before the next commit)."""
    from sparse_embed.pipeline.store.lock import output_lock

    with output_lock(cfg.out, owner=cfg.run_id, ttl_s=cfg.lock_ttl_s, wait_s=cfg.lock_wait_s):
        return _run_embed_locked(cfg)


def _run_embed_locked(cfg: EmbedConfig) -> dict:
    from sparse_embed.encoders import EncoderSpec, create_encoder
    from sparse_embed.infra.ray_launcher import ensure_ray

    from sparse_embed.pipeline.embed.sink import empty_failures, recover_pending
    from sparse_embed.pipeline.embed.todo import clear_retried, remove_work
    from sparse_embed.pipeline.index.publish import index_is_current

    timer = StageTimer()
    started = time.time()
    with timer.stage("load encoder"):
        enc = create_encoder(EncoderSpec.from_dict(cfg.spec))
    root = choose_data_root(cfg.out, enc)
    choose_removal(root, enc.dim, deletion_vectors=cfg.deletion_vectors)
    versions_before = _table_versions(root)
    with timer.stage("recover"):
        recovered = recover_pending(root, dim=enc.dim, model_version=enc.model_version)
    with timer.stage("ray"):  # listing, diff and embed tasks
        ensure_ray()
    with timer.stage("list", unit="objects") as progress:  # the count is known at the end only
        listed = listing.list_objects(cfg.source, extensions=cfg.extensions, glob=cfg.glob, parallel=cfg.parallel_listing,
                                      into=tables.table_uri(cfg.out, tables.LISTING), inventory=cfg.inventory)
        vacuum_table(tables.table_uri(cfg.out, tables.LISTING), cutoff=time.time() - listing.LISTING_RETENTION_HOURS * 3600)
        progress.update(listed.num_rows)
    with timer.stage("diff"):
        todo = _diff_and_clear(cfg, root, enc, listed)
    log.info("run %s: %s (recovered %d rows of an interrupted run)", cfg.run_id, todo.counts, recovered)
    embedded, pool, embed_seconds, failed = (_embed_todo(cfg, todo, root, enc, timer) if todo.num_rows
                                             else (0, {}, {}, empty_failures()))
    if todo.retried_buckets:
        clear_retried(cfg.out, root, cfg.run_id, todo)
    remove_work(cfg.out)  # this run holds the lock: every work directory is its own or a dead run's
    failed_by_reason, failed_by_kind, failed_first = failed["by_reason"], failed["by_kind"], failed["first"]
    promoted = root != cfg.out
    if promoted:
        with timer.stage("promote"):
            promote(cfg.out, root, enc)
    index_id = None
    if cfg.build_index and not index_is_current(report.index_root(cfg.out), tables.table_uri(cfg.out, tables.EMBEDDINGS)):
        # Whatever this run did: the index also catches up after a --no-index run, a failed
        # or killed index stage, and a promotion.
        index_id = _update_index(cfg, timer)
    result = report.build_report(cfg, enc, report.RunFacts(
        counts=todo.counts, processed=todo.num_rows, first_tries=todo.first_tries,
        embedded=embedded, failed_by_reason=failed_by_reason, failed_by_kind=failed_by_kind, failed_first=failed_first,
        recovered=recovered, removed=todo.removed, removal=todo.removal, compacted=todo.compacted,
        converted=todo.converted, deletion_guard=todo.guard,
        pool=pool, embed_seconds=embed_seconds, embed_stage_s=timer.seconds(EMBED_STAGE), timings_s=timer.as_dict(),
        wall_s=time.time() - started, versions_before=versions_before, versions_after=_table_versions(cfg.out),
        promoted=promoted, index_id=index_id))
    report.write_run_report(cfg.out, result)
    return result


def load_run_reports(out: str) -> list[dict]:
    """All run reports under <out>/runs, oldest first."""
    fs = storage.filesystem(out)
    base = storage.strip_scheme(storage.join(out, "runs"))
    try:
        paths = sorted(p for p in fs.ls(base, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    return [json.loads(fs.cat_file(p)) for p in paths]

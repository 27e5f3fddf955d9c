"""nightly.yaml: the nightly job's configuration, validated field by field.

Every wrong field gets a message that names it, says what is accepted and shows what was
given; unknown fields are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sparse_embed.pipeline.embed.decode import ALLOWED_FORMATS, check_formats
from sparse_embed.pipeline.embed.deletion_guard import DEFAULT_LIMIT, DeleteLimit
from sparse_embed.pipeline.store.tables import ROWS_PER_FILE

from .options import POOLS, PRECISIONS

EXAMPLE = """\
source: s3://bucket/images/       # prefix to embed (required)
out: s3://bucket/emb              # output prefix (required)
model: biformer_tiny              # encoder name (required)
checkpoint: s3://models/bf_t.safetensors
model_args: {}                    # extra create-model keywords
pool: token                       # token | avg | gem
extensions: [.jpg, .jpeg, .png, .webp]
formats: [JPEG, PNG, WEBP, GIF, TIFF, BMP, AVIF]  # Pillow formats decoded; others: UnsupportedFormat errors (EPS refused)
batch_size: 32
decode_batch_size: 32
compile: false                    # torch.compile the encoder on each actor (pays on long runs)
precision: fp32                   # fp32 | bf16 | fp16 (fp16 needs GPUs); part of model_version
decode: cpu                       # cpu | device (actors decode JPEGs, nvJPEG on GPUs) | auto (device with GPUs)
actor_wait_s: 0                   # autoscaling cluster: wait this long for the actors' GPUs/CPUs
max_object_mb: 256                # larger objects become fetch:TooLarge error rows, never read
rows_per_file: 8192               # rows per Parquet file the run writes
max_error_rate: 0.05              # exit 1 above this fraction of failed objects
max_attempts: 3                   # failures at one ETag before an object is left alone
lock_ttl_s: 900                   # a lock without heartbeat for this long is stale
index: true                       # update the index after embedding
allow_empty_source: false         # true: a source listing no matching object empties the table
max_delete: 10%                   # stop, changing nothing, when more listed objects than this vanish (share or count)
allow_mass_delete: false          # true: remove the rows of vanished objects whatever their number
deletion_vectors: false           # true: a new table removes rows with Delta deletion vectors (not copy-on-write)
inventory: null                   # s3://.../manifest.json of an S3 Inventory report (CSV or Parquet) to use as the listing
retain_hours: 168                 # then vacuum: remove table files and index versions no reader needs after this; null: no vacuum
"""


@dataclass
class NightlyConfig:
    source: str
    out: str
    model: str
    checkpoint: str | None = None
    model_args: dict = field(default_factory=dict)
    pool: str = "token"
    fuse_last_two: bool = False
    proj_dim: int | None = None
    extensions: list = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"])
    glob: str | None = None
    formats: list = field(default_factory=lambda: list(ALLOWED_FORMATS))  # Pillow format names; EPS is refused
    batch_size: int = 32
    decode_batch_size: int = 32
    actors: int | None = None
    compile: bool = False  # torch.compile the encoder on each actor
    precision: str = "fp32"  # part of model_version: a change re-embeds into staging
    decode: str = "cpu"  # cpu | device | auto, as `embed --decode`
    actor_wait_s: float = 0.0  # as `embed --actor-wait`
    max_object_mb: float = 256.0  # as `embed --max-object-mb`
    rows_per_file: int = ROWS_PER_FILE  # rows per Parquet file of the tables
    max_error_rate: float = 0.05  # stricter than the CLI's 1.0: a scheduled run should page someone
    max_attempts: int = 3
    lock_ttl_s: float = 900.0  # heartbeats every ttl/3, so a live run never looks stale
    index: bool = True
    index_shards: int | None = None
    allow_empty_source: bool = False  # true: a source with no matching object empties the table instead of failing
    max_delete: str = DEFAULT_LIMIT  # as `embed --max-delete`: a share ("10%", 0.1) or a count (500)
    allow_mass_delete: bool = False  # as `embed --allow-mass-delete`
    inventory: str | None = None  # an S3 Inventory manifest.json read as the listing instead of listing the source
    deletion_vectors: bool = False  # as `embed --deletion-vectors`
    retain_hours: float | None = 168.0  # as `vacuum --retain-hours`, after the run; None: no vacuum


_TYPES = {f.name: f.type for f in dataclasses.fields(NightlyConfig)}


def _check(name: str, value, expected: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"nightly config field {name!r}: expected {expected}, got {value!r}")


def _limit_ok(v) -> bool:
    try:
        DeleteLimit.parse(v)
        return True
    except ValueError:
        return False


def parse(doc) -> NightlyConfig:
    if not isinstance(doc, dict):
        raise ValueError(f"nightly config: expected a mapping of fields, got {type(doc).__name__}")
    accepted = sorted(_TYPES)
    unknown = sorted(set(doc) - set(accepted))
    if unknown:
        raise ValueError(f"nightly config: unknown field(s) {unknown}; accepted fields: {', '.join(accepted)}")
    missing = [k for k in ("source", "out", "model") if not doc.get(k)]
    if missing:
        raise ValueError(f"nightly config: required field(s) {missing} missing (example:\n{EXAMPLE})")
    for name in ("source", "out", "model"):
        _check(name, doc[name], "a non-empty string", isinstance(doc[name], str))
    for name in ("checkpoint", "glob", "inventory"):
        if doc.get(name) is not None:
            _check(name, doc[name], "a string or null", isinstance(doc[name], str))
    if "model_args" in doc:
        _check("model_args", doc["model_args"], "a mapping of create-model keywords", isinstance(doc["model_args"], dict))
    if "pool" in doc:
        _check("pool", doc["pool"], f"one of {list(POOLS)}", doc["pool"] in POOLS)
    for name in ("fuse_last_two", "index", "compile", "allow_empty_source", "deletion_vectors", "allow_mass_delete"):
        if name in doc:
            _check(name, doc[name], "true or false", isinstance(doc[name], bool))
    if "extensions" in doc:
        v = doc["extensions"]
        _check("extensions", v, "a list of extensions like ['.jpg', '.png']",
               isinstance(v, list) and v and all(isinstance(e, str) and e.startswith(".") for e in v))
    if "formats" in doc:
        v = doc["formats"]
        _check("formats", v, "a list of Pillow format names like [JPEG, PNG, TGA]",
               isinstance(v, list) and v and all(isinstance(f, str) for f in v))
        try:
            doc = doc | {"formats": list(check_formats(v))}
        except ValueError as e:
            raise ValueError(f"nightly config field 'formats': {str(e)[:1].lower()}{str(e)[1:]}") from None
    for name in ("batch_size", "decode_batch_size", "rows_per_file", "max_attempts"):
        if name in doc:
            v = doc[name]
            _check(name, v, "an integer >= 1", isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    for name in ("actors", "proj_dim", "index_shards"):
        if doc.get(name) is not None:
            v = doc[name]
            _check(name, v, "an integer >= 1 or null", isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    if "max_delete" in doc:
        v = doc["max_delete"]
        _check("max_delete", v, "a share of the table's rows (10%, 0.1) or a count of rows (500)",
               isinstance(v, (str, int, float)) and not isinstance(v, bool) and _limit_ok(v))
        doc = doc | {"max_delete": str(v)}
    if "max_error_rate" in doc:
        v = doc["max_error_rate"]
        _check("max_error_rate", v, "a number in [0, 1]", isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)
    if "precision" in doc:
        _check("precision", doc["precision"], f"one of {list(PRECISIONS)}", doc["precision"] in PRECISIONS)
    if "decode" in doc:
        _check("decode", doc["decode"], "one of ['cpu', 'device', 'auto']", doc["decode"] in ("cpu", "device", "auto"))
    if "max_object_mb" in doc:
        v = doc["max_object_mb"]
        _check("max_object_mb", v, "a number of MiB > 0", isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
    if "actor_wait_s" in doc:
        v = doc["actor_wait_s"]
        _check("actor_wait_s", v, "a number of seconds >= 0", isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
    if doc.get("retain_hours") is not None:
        v = doc["retain_hours"]
        _check("retain_hours", v, "a number of hours >= 0 or null",
               isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
    if "lock_ttl_s" in doc:
        v = doc["lock_ttl_s"]
        _check("lock_ttl_s", v, "a number of seconds > 0", isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
    return NightlyConfig(**doc)


def load(uri: str) -> NightlyConfig:
    import yaml

    from sparse_embed.pipeline.store import storage

    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"nightly config {uri!r} not found") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"nightly config {uri!r} is not valid YAML: {e}") from None
    return parse(doc)

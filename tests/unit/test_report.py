"""The run report (pipeline/embed/report.py build_report): every key run_embed's callers and
summary() read, computed from the run's facts without Ray or a store."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparse_embed.pipeline.embed.report import RunFacts, build_report, busy_report, summary
from sparse_embed.pipeline.embed.run import EmbedConfig

ENC = SimpleNamespace(spec=SimpleNamespace(model="resnet18"), model_version="resnet18-abc", dim=512)
KEYS = {"run_id", "config", "model", "model_version", "dim", "counts", "error_rate", "actor_pool", "embed_busy",
        "timings_s", "wall_s", "throughput_images_per_s", "table_versions", "promoted_model_version", "index_id", "removal",
        "deletion_guard"}


def _facts(**changes) -> RunFacts:
    facts = RunFacts(
        counts={"listed": 12, "new": 10, "changed": 1, "deleted": 2, "unchanged": 1, "retried": 1, "gave_up": 0},
        processed=12, first_tries=10, embedded=9, failed_by_reason={"decode:NotAnImage": 2, "decode:DecodeError": 1},
            failed_by_kind={"object": {"decode:NotAnImage": 2, "decode:DecodeError": 1}, "infrastructure": {}},
        failed_first=2, recovered=4, removed=3, compacted=0,
        removal={"mechanism": "copy-on-write", "files_touched": 1, "files_rewritten": 1, "bytes_written": 100, "version": 4}, pool={"size": 2, "num_gpus": 0, "num_cpus": 0.75, "decode_cpus": 0.25},
        embed_seconds={"h:2": 1.0, "h:1": 3.0}, embed_stage_s=4.0,
        timings_s={"list": 1.0, "fetch+decode+embed+write": 4.0}, wall_s=9.5,
        versions_before={"embeddings": 3, "errors": None}, versions_after={"embeddings": 5, "errors": 1},
        promoted=False, index_id="idx-1")
    for k, v in changes.items():
        setattr(facts, k, v)
    return facts


def _cfg() -> EmbedConfig:
    return EmbedConfig(source="s3://b/images/", out="s3://user:pw@b/out", spec={"model": "resnet18"}, run_id="r1")


def test_report_keys_and_values():
    r = build_report(_cfg(), ENC, _facts())
    assert set(r) == KEYS
    assert (r["run_id"], r["model"], r["model_version"], r["dim"]) == ("r1", "resnet18", "resnet18-abc", 512)
    assert r["counts"] == {"listed": 12, "new": 10, "changed": 1, "deleted": 2, "unchanged": 1, "retried": 1, "gave_up": 0,
                           "processed": 12, "embedded": 9, "failed": 3,
                           "failed_by_reason": {"decode:NotAnImage": 2, "decode:DecodeError": 1},
                           "failed_first_try": 2, "recovered_rows": 4, "failed_object": 3,
                           "failed_infrastructure": 0, "failed_infrastructure_by_reason": {},
                           "removed_rows": 3, "compacted_rows": 0, "converted_rows": 0}
    assert r["removal"]["mechanism"] == "copy-on-write" and r["removal"]["files_rewritten"] == 1
    assert r["error_rate"] == pytest.approx(2 / 10)
    assert r["throughput_images_per_s"] == pytest.approx(12 / 4.0)
    assert r["embed_busy"] == {"fraction": 0.5, "by_actor": {"h:1": 0.75, "h:2": 0.25}}
    assert r["table_versions"] == {"before": {"embeddings": 3, "errors": None}, "after": {"embeddings": 5, "errors": 1}}
    assert r["promoted_model_version"] is None and r["index_id"] == "idx-1" and r["wall_s"] == 9.5
    assert r["config"]["out"] == "s3://***@b/out" and r["config"]["spec"] == {"model": "resnet18"}
    assert r["config"]["run_id"] == "r1" and r["config"]["rows_per_file"] == _cfg().rows_per_file
    assert "processed 12: embedded 9, failed 3" in summary(r)


def test_report_of_a_run_with_nothing_to_do():
    r = build_report(_cfg(), ENC, _facts(processed=0, first_tries=0, embedded=0, failed_by_reason={}, failed_by_kind={}, failed_first=0,
                                         pool={}, embed_seconds={}, embed_stage_s=0.0, promoted=True, index_id=None))
    assert r["error_rate"] == 0.0 and r["throughput_images_per_s"] == 0.0
    assert r["embed_busy"] == {"fraction": 0.0, "by_actor": {}}
    assert r["counts"]["failed"] == 0 and r["promoted_model_version"] == "resnet18-abc"
    summary(r)


def test_busy_report_counts_an_idle_actor_in_the_pool():
    assert busy_report({"a": 2.0}, {"size": 2}, 4.0) == {"fraction": 0.25, "by_actor": {"a": 0.5}}
    assert busy_report({"a": 2.0}, {"size": 2}, 0.0) == {"fraction": 0.0, "by_actor": {}}


def test_a_long_run_whose_actors_waited_says_so_and_a_short_one_does_not():
    # 2 actors x 20 batches of 32 = 1,280 images at least; busy 0.5 of the stage
    long_starved = build_report(_cfg(), ENC, _facts(processed=2000, embed_seconds={"h:1": 5.0, "h:2": 5.0},
                                                    embed_stage_s=10.0))
    assert "waited for input 50% of the stage" in summary(long_starved)
    busy = build_report(_cfg(), ENC, _facts(processed=2000, embed_seconds={"h:1": 9.0, "h:2": 8.0}, embed_stage_s=10.0))
    assert "waited for input" not in summary(busy)
    assert "waited for input" not in summary(build_report(_cfg(), ENC, _facts()))  # 12 images: start-up dominates

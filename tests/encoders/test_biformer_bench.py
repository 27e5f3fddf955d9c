"""`sparse-embed bench encoders` (benchmarks/encoders.py): case selection, skip rules, the table,
and one real end-to-end run at a tiny size."""
from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import cases
from benchmarks import encoders as bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_match_the_issue():
    args = _args()
    assert args.sizes == [224, 512, 1024] and args.batch_sizes == [1, 8]
    with pytest.raises(SystemExit):
        _args("--sizes", "224,abc")


def test_select_cases():
    labels = [c.label for c in bench.select_cases("biformer,baselines", "")]
    assert bench.DEFAULT_LABEL in labels and "biformer_tiny scaled/reference" in labels
    assert {"vit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny"} <= set(labels)
    assert [c.label for c in bench.select_cases("biformer", "fixed/")] == [
        "biformer_tiny fixed/auto", "biformer_tiny fixed/reference"]
    with pytest.raises(ValueError, match="suites"):
        bench.select_cases("nope", "")


def test_dense_case_skips_large_inputs():
    dense = next(c for c in cases.biformer_cases() if c.label.endswith("scaled/dense"))
    assert dense.skip(512, 1) is None
    assert "N^2" in dense.skip(1024, 1) and dense.skip(512, 8)  # 512x512 px per batch at most


def test_markdown_ratios():
    rows = [
        dict(model=bench.DEFAULT_LABEL, size=512, batch=1, skipped="", img_s=2.0, ms=500, peak_mib=100,
             rss_mib=150),
        dict(model="biformer_tiny scaled/reference", size=512, batch=1, skipped="", img_s=1.0, ms=1000,
             peak_mib=400, rss_mib=300),
        dict(model="vit_small_patch16_224", size=512, batch=1, skipped="too big"),
    ]
    text = bench.format_markdown(rows, {"date": "today"})
    assert "| 512 | 1 | biformer_tiny scaled/reference | 2.00 | 0.25 | 0.50 |" in text
    assert "skipped: too big" in text


def test_allocated_peak_counts_live_tensors_only():
    import torch

    def work():
        a = torch.ones(2 * 2**20)  # 8 MiB
        del a
        b = torch.ones(2**20)  # 4 MiB, after the 8 MiB was freed
        c = torch.ones(2**20)  # 4 MiB more: 8 MiB live at the peak
        return b.sum() + c.sum()

    assert bench._allocated_peak_mib(work) == pytest.approx(8.0, abs=0.1)
    held = torch.ones(4 * 2**20)  # allocated before the call: not counted
    assert bench._allocated_peak_mib(lambda: torch.ones(2**20).sum()) == pytest.approx(4.0, abs=0.1)
    del held


@pytest.mark.slow
def test_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.run(_args("--sizes", "32", "--batch-sizes", "1", "--repeats", "1",
                           "--models", "scaled/auto", "--out", str(out))) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["img_s"] > 0 and rows[0]["peak_mib"] > 0 and rows[0]["rss_mib"] >= 0
    assert bench.DEFAULT_LABEL in capsys.readouterr().out


@pytest.mark.gpu
def test_run_on_gpu_in_bf16(tmp_path):
    import torch

    out = tmp_path / "rows.json"
    assert bench.run(_args("--sizes", "64", "--batch-sizes", "1,2", "--repeats", "1",
                           "--models", "scaled/auto,scaled/reference", "--out", str(out))) == 0
    doc = json.loads(out.read_text())
    assert torch.cuda.get_device_name() in doc["meta"]["machine"] and "bf16" in doc["meta"]["machine"]
    assert all(r["img_s"] > 0 and r["peak_mib"] > 0 for r in doc["rows"])

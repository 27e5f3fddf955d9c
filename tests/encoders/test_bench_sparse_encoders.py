"""The LookupViT / top-k benchmark module: exact MAC counts against closed forms, one tiny case end to end."""
import argparse

import timm
import torch

from sparse_embed import encoders  # noqa: F401
from benchmarks import sparse_encoders as bench


def test_count_macs_matches_closed_form():
    """LookupViT-Ti, 64 px, M = 9: per block 4*N*D^2 (lookup side) + 15*M*D^2 (compressed side:
    q, proj_c, qkv, proj, MLP 8, v_c) + 3*M*N*D (logits, two attention products) + 2*M^2*D
    (self-attention on M), plus the 16x16x3 patch embedding; no classifier."""
    m = timm.create_model('lookupvit_tiny_patch16', num_classes=0, compressed_grid=3).eval()
    D, N, M, depth = 192, 16, 9, 12
    want = N * 768 * D + depth * (4 * N * D * D + 15 * M * D * D + 3 * M * N * D + 2 * M * M * D)
    assert bench.count_macs(m, torch.zeros(1, 3, 64, 64)) == want


def test_count_macs_includes_cpu_sdpa():
    """ViT-Ti 64 px (N = 17): qkv 3, proj 1, MLP 8 (x N*D^2) and attention 2*N^2*D per block."""
    m = timm.create_model('vit_tiny_patch16_224', num_classes=0, dynamic_img_size=True).eval()
    D, N = 192, 17
    want = 16 * 768 * D + 12 * (12 * N * D * D + 2 * N * N * D)
    assert bench.count_macs(m, torch.zeros(1, 3, 64, 64)) == want


def test_measure_one_small_case_and_table():
    case = bench.Pair('topk', 'vit_tiny_patch16_224_topk', 'vit_tiny_patch16_224', 64,
                      model_args={'keep': 17}, baseline_args={'dynamic_img_size': True}, same_weights=True)
    row = bench.measure(case, repeats=1)
    assert row['mac_ratio'] > 0.99  # K = N: same MACs up to the selection scores
    assert abs(row['cosine'] - 1) < 1e-5  # same weights, K = N: the dense embedding
    assert 'vit_tiny_patch16_224_topk' in bench.format_table([row])


def test_cli_arguments_and_suites():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(['--suites', 'lookupvit', 'topk', '--sizes', '224', '512'])
    cases = bench.cases_for(args)
    assert {c.img_size for c in cases} == {224, 512}
    assert len(cases) == 3 * 2 + 2 * 2  # 3 LookupViT variants, top-k with and without remainder
    assert [c.model for c in bench.target_cases()] == ['lookupvit_base_patch16', 'vit_small_patch16_224_topk']


def test_registered_in_bench_encoders():
    """`sparse-embed bench encoders --suites lookupvit,topk` picks up the cases built here."""
    from benchmarks import encoders as bench_encoders

    cases = bench_encoders.select_cases('lookupvit,topk', '')
    assert [c.model for c in cases] == [
        'lookupvit_tiny_patch16', 'vit_tiny_patch16_224', 'lookupvit_small_patch16', 'vit_small_patch16_224',
        'vit_small_patch16_224_topk', 'vit_small_patch16_224_topk', 'vit_small_patch16_224']
    assert len({c.label for c in cases}) == len(cases)
    with torch.inference_mode():
        assert cases[0].build(64)(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)

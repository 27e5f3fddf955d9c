"""The search server's pure parts: what a request may ask for (k, image_id, the one query,
the upload size), when CURRENT is read again, loopback addresses, the thumbnail LRU and the
thumbnail itself, and the `serve` command's defaults and first error."""
from __future__ import annotations

import io

import pytest

from sparse_embed.pipeline.serve.live_index import LiveIndex, check_due
from sparse_embed.pipeline.serve.requests import (DEFAULT_K, MAX_K, RequestError, check_upload_size, parse_image_id,
                                                  parse_k, search_query)
from sparse_embed.pipeline.serve.access import is_loopback
from sparse_embed.pipeline.serve.runner import address
from sparse_embed.pipeline.serve.thumbs import ThumbCache, thumbnail_jpeg


@pytest.mark.parametrize("value,want", [(None, DEFAULT_K), ("", DEFAULT_K), ("5", 5), (1, 1), (MAX_K, MAX_K), (7.0, 7)])
def test_k_within_bounds(value, want):
    assert parse_k(value) == want


@pytest.mark.parametrize("value", [0, -1, MAX_K + 1, "abc", 1.5, True, [3], "1e3"])
def test_k_outside_bounds_is_a_400_naming_the_range(value):
    with pytest.raises(RequestError) as e:
        parse_k(value)
    assert e.value.status == 400 and f"to {MAX_K}" in str(e.value) and repr(value)[:3] in str(e.value)


def test_the_default_k_is_capped_by_a_smaller_max_k():
    assert parse_k(None, max_k=10) == 10
    with pytest.raises(RequestError, match="k from 1 to 10, got 11"):
        parse_k(11, max_k=10)


@pytest.mark.parametrize("value,want", [("42", 42), (" 7 ", 7), (0, 0), (2 ** 63 - 1, 2 ** 63 - 1)])
def test_image_id(value, want):
    assert parse_image_id(value) == want


@pytest.mark.parametrize("value", ["-1", "1e3", "4.0", "", None, "\u0663", "..%2Fetc", 2 ** 63, 3.0, True, "0x10"])
def test_bad_image_id_is_a_400(value):
    with pytest.raises(RequestError) as e:
        parse_image_id(value)
    assert e.value.status == 400 and "image_id" in str(e.value)


def test_upload_size_limit_is_a_413_in_words():
    check_upload_size(None, 100)  # a chunked request declares no length: read under aiohttp's own cap
    check_upload_size(100, 100)
    check_upload_size(150, 100, slack=50)
    with pytest.raises(RequestError) as e:
        check_upload_size(151, 100, slack=50)
    assert e.value.status == 413 and str(e.value).startswith("The upload is 151 bytes, over this server's limit of 100 bytes")
    assert "--max-upload-mb" in str(e.value)


def test_search_query_takes_exactly_one_of_upload_image_id_uri():
    assert search_query({"image_id": "3", "k": "5"}).image_id == 3
    assert search_query({"uri": " s3://b/a.jpg "}).uri == "s3://b/a.jpg"
    q = search_query({"image": b"\xff\xd8bytes"})
    assert (q.kind, q.upload, q.k) == ("upload", b"\xff\xd8bytes", DEFAULT_K)
    for fields, needle in [({}, "got none"), ({"image_id": 1, "uri": "s3://b/a"}, "got image_id and uri"),
                           ({"image": b"x", "image_id": 2}, "got image and image_id"), ({"uri": "a\x00b"}, "uri"),
                           ({"image": "not bytes"}, "file upload"), ({"image_id": 1, "path": "/etc/passwd"}, "'path'"),
                           ([1, 2], "JSON object")]:
        with pytest.raises(RequestError, match=needle) as e:
            search_query(fields)
        assert e.value.status == 400


def test_search_query_refuses_an_upload_over_the_limit():
    with pytest.raises(RequestError) as e:
        search_query({"image": bytes(1001)}, max_upload_bytes=1000)
    assert e.value.status == 413 and "1,001 bytes" in str(e.value)


def test_current_is_read_again_only_when_due():
    assert check_due(None, 0.0, 2.0)
    assert not check_due(10.0, 11.9, 2.0)
    assert check_due(10.0, 12.0, 2.0)
    assert check_due(10.0, 10.0, 0.0)
    with pytest.raises(ValueError, match="interval >= 0"):
        LiveIndex("s3://b/index", check_every_s=-1)


@pytest.mark.parametrize("host,want", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                       ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.com", False)])
def test_loopback(host, want):
    assert is_loopback(host) is want


def test_address():
    assert address("127.0.0.1", 8080) == "http://127.0.0.1:8080/"
    assert address("::1", 81) == "http://[::1]:81/"


def test_thumb_cache_on_disk_is_keyed_by_etag_and_evicts_least_recently_used_by_bytes(tmp_path):
    import os
    import time

    cache = ThumbCache(tmp_path / "thumbs", max_bytes=10)
    cache.put("s3://b/a.jpg", "e1", b"1234")
    cache.put("s3://b/b.jpg", "e1", b"1234")
    past = time.time() - 60
    for p in (tmp_path / "thumbs").glob("*/*.jpg"):
        os.utime(p, (past, past))
    assert cache.get("s3://b/a.jpg", "e2") is None, "another etag: another thumbnail"
    assert cache.get("s3://b/a.jpg", "e1") == b"1234"  # a is now the most recent
    cache.put("s3://b/c.jpg", "e1", b"1234")  # 12 bytes: b goes
    assert (cache.get("s3://b/b.jpg", "e1"), cache.get("s3://b/a.jpg", "e1"), cache.get("s3://b/c.jpg", "e1"),
            len(cache)) == (None, b"1234", b"1234", 1 + 1)
    again = ThumbCache(tmp_path / "thumbs", max_bytes=10)  # a restarted server finds them
    assert again.get("s3://b/c.jpg", "e1") == b"1234" and again._bytes == 8


def test_thumbnail_is_a_square_jpeg_and_refuses_what_the_job_refuses():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(buf, "PNG")
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(buf.getvalue())))
    assert (thumb.format, thumb.size) == ("JPEG", (256, 256))
    assert abs(thumb.getpixel((128, 128))[0] - 200) < 8
    with pytest.raises(RequestError) as e:
        thumbnail_jpeg(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    assert e.value.status == 422 and "EPS" in str(e.value)


def test_serve_listens_on_loopback_by_default():
    from sparse_embed.jobs.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "s3://b/index"])
    assert (args.host, args.port, args.max_upload_mb, args.max_k) == ("127.0.0.1", 8080, 20, 200)


def test_serve_before_any_index_exits_2(tmp_path, capsys):
    from sparse_embed.jobs.cli import main

    index = str(tmp_path / "emb" / "index")
    assert main(["serve", "--index", index, "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"sparse-embed serve: error: No index at '{index}' (no CURRENT pointer)")


def test_serve_refuses_a_port_out_of_range(tmp_path, capsys):
    from sparse_embed.jobs.cli import main

    assert main(["serve", "--index", str(tmp_path), "--port", "70000"]) == 2
    assert "Expected --port from 0 to 65535, got 70000" in capsys.readouterr().err


def test_bench_serve_percentiles_by_nearest_rank():
    from benchmarks.serve import latency_summary, nearest_rank

    samples = [float(i) for i in range(1, 101)]  # 1..100 s
    assert (nearest_rank(samples, 50), nearest_rank(samples, 99), nearest_rank(samples, 100)) == (50.0, 99.0, 100.0)
    assert nearest_rank([3.0, 1.0, 2.0], 50) == 2.0 and nearest_rank([5.0], 99) == 5.0
    s = latency_summary([0.010, 0.030, 0.020])
    assert (s["n"], s["p50_ms"], s["p99_ms"], s["max_ms"]) == (3, 20.0, 30.0, 30.0) and abs(s["mean_ms"] - 20.0) < 1e-9
    with pytest.raises(ValueError, match="0 < q <= 100"):
        nearest_rank(samples, 0)

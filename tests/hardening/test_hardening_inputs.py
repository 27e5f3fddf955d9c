"""Hardening, bad inputs: 30 kinds of hostile or odd objects through the real embed job
(jobs.cli -> run_embed) on the local S3 server, in ONE run. Each object ends as exactly one
embedding row or one error row naming stage and reason; the job completes; the exit code
follows --max-error-rate.

Changed-after-listing policy: an object overwritten between listing and fetch becomes the
error row `fetch:ETagMismatch` (the GET carries If-Match with the listed etag, and the
response's ETag and length are checked); it is never recorded under the listed etag with
the new bytes' embedding. The next run lists the new etag and embeds it.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sparse_embed.infra.synthetic_images import base_image, encode
from sparse_embed.pipeline.embed import listing
from sparse_embed.pipeline.store import live, storage, tables
from sparse_embed.pipeline.index.snapshot import vectors_of

pytestmark = pytest.mark.integration

MODEL = "resnet10t"  # random init, seeded: every actor builds the same weights
EXTRA_EXT = (".jxl", ".heic", ".avif")  # listed, so a format Pillow cannot read reaches the decoder
MAX_PIXELS = 50_000_000  # below Pillow's own bomb limit, so both guards are exercised
MAX_OBJECT_MB = 0.25  # every other object is far smaller (the largest is a few tens of KB)

EMB = "embedding"


def _rgb(seed: int, w: int = 64, h: int = 48) -> Image.Image:
    return base_image(np.random.default_rng(seed), width=w, height=h)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims width x height (a few hundred bytes)."""
    data = bytearray(_save(Image.new("L", (8, 8)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _solid(colour, size=(48, 48)) -> Image.Image:
    img = Image.new("RGB", size, colour)
    img.paste(tuple(255 - c for c in colour), (8, 8, 24, 40))  # a block, so frames differ in layout too
    return img


FRAMES = [_solid((220, 30, 30)), _solid((30, 30, 220)), _solid((30, 200, 30))]


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, expected end: "embedding" or "stage:error_type"). Deterministic."""
    jpeg = encode(_rgb(1), "JPEG")
    png = encode(_rgb(2), "PNG")
    upright = _rgb(3, 64, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores for orientation 6
    bad_exif = Image.Exif()
    bad_exif[0x0112] = 9  # not a valid orientation: decode as stored
    pal = _rgb(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    la = _rgb(5).convert("L")
    la.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1)), "L"))
    g16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    f32 = Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64))
    gif_anim = _save(FRAMES[0], "GIF", save_all=True, append_images=FRAMES[1:], duration=100, loop=0)
    webp_anim = _save(FRAMES[0], "WEBP", save_all=True, append_images=FRAMES[1:], duration=100, lossless=True)
    tiff_pages = _save(FRAMES[0], "TIFF", save_all=True, append_images=FRAMES[1:])
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    rng = np.random.default_rng(7)
    return {
        # -- must fail, with a named stage and reason
        "bad/zero_bytes.jpg": (b"", "decode:NotAnImage"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "decode:DecodeError"),
        "bad/truncated.png": (png[: len(png) // 2], "decode:DecodeError"),
        "bad/html_error_page.jpg": (b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>", "decode:NotAnImage"),
        "bad/text.png": (b"just some text\n" * 20, "decode:NotAnImage"),
        "bad/bomb_declared_30000x30000.png": (_png_declaring(30000, 30000), "decode:DecompressionBomb"),  # Pillow's guard
        "bad/bomb_declared_8000x8000.png": (_png_declaring(8000, 8000), "decode:DecompressionBomb"),  # --max-pixels
        "bad/jpeg_xl.jxl": (b"\xff\x0a" + rng.bytes(300), "decode:NotAnImage"),
        "bad/heic.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + rng.bytes(300), "decode:NotAnImage"),
        "bad/postscript_as.jpg": (eps, "decode:UnsupportedFormat"),  # an image, but EPS would run Ghostscript: never decoded
        "bad/random_bytes.avif": (rng.bytes(500), "decode:NotAnImage"),
        "bad/over_the_size_cap.jpg": (jpeg + bytes(300_000), "fetch:TooLarge"),  # --max-object-mb: never read
        # -- odd but valid: must embed
        "ok/png_16bit_grey.png": (_save(g16, "PNG"), EMB),
        "ok/float32_grey.tif": (_save(f32, "TIFF"), EMB),
        "ok/cmyk.jpg": (_save(_rgb(6).convert("CMYK"), "JPEG", quality=90), EMB),
        "ok/palette_transparency.png": (_save(pal, "PNG", transparency=0), EMB),
        "ok/palette_transparency.gif": (_save(pal, "GIF", transparency=0), EMB),
        "ok/grey_alpha.png": (_save(la, "PNG"), EMB),
        "ok/bilevel.png": (_save(_rgb(8).convert("1"), "PNG"), EMB),
        "ok/exif_rotated.jpg": (_save(sideways, "JPEG", quality=95, exif=exif), EMB),
        "ok/exif_upright_reference.jpg": (_save(upright, "JPEG", quality=95), EMB),
        "ok/exif_sideways_no_tag.jpg": (_save(sideways, "JPEG", quality=95), EMB),
        "ok/exif_invalid_orientation.jpg": (_save(_rgb(9), "JPEG", quality=90, exif=bad_exif), EMB),
        "ok/animated.gif": (gif_anim, EMB),
        "ok/animated.webp": (webp_anim, EMB),
        "ok/multipage.tif": (tiff_pages, EMB),
        "ok/frame0.png": (_save(FRAMES[0], "PNG"), EMB),
        "ok/frame1.png": (_save(FRAMES[1], "PNG"), EMB),
        "ok/one_pixel.png": (_save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), EMB),
        "ok/wide_20000x1.png": (_save(Image.fromarray((np.arange(20000) % 256).astype(np.uint8).reshape(1, 20000), "L"), "PNG"), EMB),
        "ok/tall_1x20000.png": (_save(Image.new("RGB", (1, 20000), (90, 90, 200)), "PNG"), EMB),
        "ok/png_named.jpg": (png, EMB),  # content decides the format, not the name
        "ok/bmp.bmp": (_save(_rgb(10), "BMP"), EMB),
        # -- keys real buckets hold
        "keys/with space.jpg": (jpeg, EMB),
        "keys/ünïcødé 画像.jpg": (jpeg, EMB),
        "keys/100%.jpg": (jpeg, EMB),
        "keys/%2F-encoded.jpg": (jpeg, EMB),
        "keys/a#b.jpg": (jpeg, EMB),
        "keys/what?.jpg": (jpeg, EMB),
        "keys/a+b.jpg": (jpeg, EMB),
        # -- changed between listing and fetch (the listing hook below does it)
        "race/deleted_after_listing.jpg": (jpeg, "fetch:FileNotFoundError"),
        "race/overwritten_after_listing.jpg": (jpeg, "fetch:ETagMismatch"),
    }


OVERWRITE_WITH = encode(_rgb(11, 56, 56), "JPEG")


def _cli(*args: str) -> int:
    from sparse_embed.jobs.cli import main

    return main(["embed", *args])


@pytest.fixture(scope="module")
def run(object_store, ray_local):
    bucket = object_store.create_bucket("hardening-inputs")
    source, out = f"{bucket}/in/", f"{bucket}/out"
    objects = bad_inputs()
    storage.put_many(source, {k: v for k, (v, _) in objects.items()})
    original = listing.list_objects

    def list_then_race(*a, **kw):  # the job lists; then the bucket changes under it
        listed = original(*a, **kw)
        fs = storage.filesystem(source)
        fs.rm_file(storage.strip_scheme(source + "race/deleted_after_listing.jpg"))
        storage.put_many(source, {"race/overwritten_after_listing.jpg": OVERWRITE_WITH})
        return listed

    ext = ",".join(listing.DEFAULT_EXTENSIONS + EXTRA_EXT)
    args = [source, "--out", out, "--model", MODEL, "--ext", ext, "--max-pixels", str(MAX_PIXELS),
            "--max-object-mb", str(MAX_OBJECT_MB),
            "--decode-batch-size", "8", "--batch-size", "8", "--no-index"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(listing, "list_objects", list_then_race)
        rc = _cli(*args, "--max-error-rate", "0.05")
    from sparse_embed.pipeline.embed.run import load_run_reports

    report = load_run_reports(out)[-1]
    return {"source": source, "out": out, "objects": objects, "rc": rc, "report": report, "args": args}


def _rows(out: str) -> tuple[dict, dict]:
    emb = live.read_live(tables.table_uri(out, tables.EMBEDDINGS))
    vec = vectors_of(emb.column("embedding"))
    e = {u: (etag, vec[i]) for i, (u, etag) in enumerate(zip(emb.column("uri").to_pylist(), emb.column("etag").to_pylist()))}
    err = live.read_live(tables.table_uri(out, tables.ERRORS), ["uri", "etag", "stage", "error_type", "message"])
    f = {u: (s, t, m, etag) for u, etag, s, t, m in zip(*(err.column(c).to_pylist() for c in ("uri", "etag", "stage", "error_type", "message")))}
    return e, f


def test_at_least_20_kinds(run):
    """The one run saw at least 20 kinds of input. A kind is a distinct payload (the keys/
    and race/ objects share one JPEG), and the store's etag names the payload, so the run's
    own rows (the tables as that run left them) count the kinds it recorded."""
    kinds = len({data for data, _ in run["objects"].values()})
    after = run["report"]["table_versions"]["after"]
    etags = []
    for name in (tables.EMBEDDINGS, tables.ERRORS):
        t = live.read_live(tables.table_uri(run["out"], name), ["uri", "etag"], version=after[name])
        etags += t.column("etag").to_pylist()
    assert len(etags) == len(run["objects"]), "one row per listed object"
    assert len(set(etags)) == kinds >= 20, (len(set(etags)), kinds)


def test_each_object_ends_as_its_expected_row(run):
    emb, err = _rows(run["out"])
    src = run["source"]
    assert not set(emb) & set(err), "an object is either embedded or failed, never both"
    got = {}
    for key in run["objects"]:
        uri = src + key
        got[key] = EMB if uri in emb else f"{err[uri][0]}:{err[uri][1]}" if uri in err else "MISSING"
    expected = {k: want for k, (_, want) in run["objects"].items()}
    assert got == expected
    assert all(m and len(m) <= 1000 for (_, _, m, _) in err.values()), "every error row carries a reason"
    assert len(emb) + len(err) == len(run["objects"])


def test_job_completes_and_exit_code_follows_max_error_rate(run):
    report = run["report"]
    c = report["counts"]
    n_bad = sum(1 for _, want in run["objects"].values() if want != EMB)
    assert c["listed"] == len(run["objects"]) and c["failed"] == n_bad and c["embedded"] == len(run["objects"]) - n_bad
    assert report["error_rate"] == pytest.approx(n_bad / len(run["objects"]))
    assert report["error_rate"] > 0.05 and run["rc"] == 1, "above --max-error-rate: exit 1"
    assert c["failed_by_reason"]["fetch:ETagMismatch"] == 1 and c["failed_by_reason"]["decode:DecompressionBomb"] == 2
    assert c["failed_by_reason"]["fetch:TooLarge"] == 1


def test_overwritten_object_never_carries_the_listed_etag_with_new_bytes(run):
    _, err = _rows(run["out"])
    uri = run["source"] + "race/overwritten_after_listing.jpg"
    listed_etag = err[uri][3]
    info = storage.filesystem(uri).info(storage.strip_scheme(uri))
    assert listed_etag != info["ETag"].strip('"'), "the error row keeps the etag that was listed"


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_exif_rotated_jpeg_is_embedded_upright(run):
    emb, _ = _rows(run["out"])
    s = run["source"]
    rotated, upright, sideways = (emb[s + k][1] for k in ("ok/exif_rotated.jpg", "ok/exif_upright_reference.jpg",
                                                            "ok/exif_sideways_no_tag.jpg"))
    # The rotated file and the upright reference are two JPEG encodes of the same pixels.
    # A random-init network maps all images close together (cosines ~0.999), so compare
    # distances: the upright reference must be 10x closer than the same pixels unrotated.
    d_up, d_side = 1 - _cos(rotated, upright), 1 - _cos(rotated, sideways)
    assert d_up < 0.1 * d_side, (d_up, d_side)


@pytest.mark.parametrize("key", ["ok/animated.gif", "ok/animated.webp", "ok/multipage.tif"])
def test_animations_and_pages_embed_their_first_frame(run, key):
    emb, _ = _rows(run["out"])
    s = run["source"]
    v, f0, f1 = emb[s + key][1], emb[s + "ok/frame0.png"][1], emb[s + "ok/frame1.png"][1]
    d0, d1 = 1 - _cos(v, f0), 1 - _cos(v, f1)
    assert d0 < 0.1 * d1, (d0, d1)


def test_rerun_embeds_the_new_bytes_and_exits_0(run):
    """Known-bad objects are retried but do not count against --max-error-rate again; the
    overwritten object is embedded at its new etag; the deleted one leaves no row."""
    rc = _cli(*run["args"], "--max-error-rate", "0.05")
    assert rc == 0
    emb, err = _rows(run["out"])
    s = run["source"]
    uri = s + "race/overwritten_after_listing.jpg"
    assert uri in emb and uri not in err
    assert emb[uri][0] == storage.filesystem(uri).info(storage.strip_scheme(uri))["ETag"].strip('"')
    gone = s + "race/deleted_after_listing.jpg"
    assert gone not in emb and gone not in err
    n_bad = sum(1 for _, want in run["objects"].values() if want.startswith("decode:") or want == "fetch:TooLarge")
    assert len(err) == n_bad and len(emb) + len(err) == len(run["objects"]) - 1


def test_local_file_replaced_after_listing_is_an_etag_mismatch(tmp_path):
    """The same policy for local directories, whose etag is size-mtime (no Ray needed)."""
    import os

    from sparse_embed.pipeline.embed.decode import ETagMismatch, fetch_many

    (tmp_path / "a.jpg").write_bytes(b"one")
    (tmp_path / "b.jpg").write_bytes(b"two")
    listed = listing.list_objects(str(tmp_path))
    uris, etags, sizes = (listed.column(c).to_pylist() for c in ("uri", "etag", "size"))
    (tmp_path / "a.jpg").write_bytes(b"three")
    st = os.stat(tmp_path / "a.jpg")
    os.utime(tmp_path / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    got = fetch_many(uris, etags, sizes)
    assert isinstance(got[uris[0]], ETagMismatch) and got[uris[1]] == b"two"

"""--formats: images Pillow reads in formats not asked for become UnsupportedFormat rows
naming the format and the option; bytes that are no image stay NotAnImage; EPS is refused
without Ghostscript (or Pillow's EPS plugin) ever running."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sparse_embed.jobs.cli import main
from sparse_embed.pipeline.embed.decode import (ALLOWED_FORMATS, NotAnImage, ResizePlan, UnsupportedFormat, check_formats,
                                                decodable_formats, decode_image, fetch_decode_batch)

PLAN = ResizePlan(height=32, width=32, scale_short=32, interpolation="bilinear")
CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
# DOS EPS binary header: magic C5D0D3C6, then PostScript offset 30 and length, as Pillow's plugin reads it
DOS_EPS = b"\xc5\xd0\xd3\xc6" + (30).to_bytes(4, "little") + len(EPS).to_bytes(4, "little") + bytes(18) + EPS


def _pixels(seed: int, w: int = 48, h: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)  # TGA, PPM and Pillow's default JPEG 2000 (reversible wavelet) are lossless
    return buf.getvalue()


OTHER = {"TGA": 0, "JPEG2000": 1, "PPM": 2}  # format -> pixel seed


@pytest.mark.parametrize("fmt", sorted(OTHER))
def test_other_format_is_unsupported_by_default_naming_format_and_option(fmt):
    with pytest.raises(UnsupportedFormat) as e:
        decode_image(_save(_pixels(OTHER[fmt]), fmt), PLAN)
    msg = str(e.value)
    assert f"format {fmt} " in msg and "--formats" in msg and "nightly config: formats" in msg, msg


@pytest.mark.parametrize("fmt", sorted(OTHER))
def test_formats_naming_it_decodes_the_same_pixels_as_png(fmt):
    img = _pixels(OTHER[fmt])
    got, w, h = decode_image(_save(img, fmt), PLAN, formats=check_formats(["jpeg", fmt.lower()]))
    ref, _, _ = decode_image(_save(img, "PNG"), PLAN)
    assert (w, h) == img.size
    diff = int(np.abs(got.astype(int) - ref.astype(int)).max())
    assert diff == 0, f"{fmt} decoded differently from the same pixels as PNG: max abs diff {diff}"


def test_a_default_format_left_out_of_formats_becomes_unsupported():
    with pytest.raises(UnsupportedFormat, match="add JPEG to --formats"):
        decode_image(_save(_pixels(3), "JPEG"), PLAN, formats=("TGA",))


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_stay_not_an_image(seed):
    data = np.random.default_rng(100 + seed).bytes(500)
    with pytest.raises(NotAnImage):
        decode_image(data, PLAN, formats=check_formats(sorted(OTHER) + list(ALLOWED_FORMATS)))


@pytest.mark.parametrize("data", [EPS, DOS_EPS, b"%!PS-Adobe-2.0\n%%Pages: 1\nshowpage\n"], ids=["eps", "dos-eps", "ps"])
def test_eps_is_refused_without_ghostscript_or_the_eps_plugin(data, monkeypatch):
    from PIL import EpsImagePlugin

    touched = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: touched.append("Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: touched.append("has_ghostscript") or True)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: touched.append("_open"))
    everything = decodable_formats()  # every format Pillow opens, EPS aside
    assert "TGA" in everything and "EPS" not in everything
    for formats in (ALLOWED_FORMATS, everything, everything + ("EPS",)):  # the last bypasses check_formats
        with pytest.raises(UnsupportedFormat, match="EPS.*Ghostscript"):
            decode_image(data, PLAN, formats=formats)
    assert touched == []


@pytest.mark.parametrize("names", [["EPS"], ["jpeg", "eps"], ["PS"]])
def test_formats_refuse_eps(names):
    with pytest.raises(ValueError, match="Ghostscript"):
        check_formats(names)


def test_check_formats_normalises_and_names_unknown():
    assert check_formats([" jpeg", "Tga", "JPEG", "jpeg2000"]) == ("JPEG", "TGA", "JPEG2000")
    with pytest.raises(ValueError, match=r"Expected Pillow format names \(.*TGA.*\), got 'JPG'"):
        check_formats(["JPEG", "JPG"])
    with pytest.raises(ValueError, match="non-empty"):
        check_formats([])


def test_batch_rows_follow_formats(tmp_path):
    """A local directory is a source: rows for a TGA, a JPEG 2000, a PPM, random bytes and EPS."""
    files = {f"img.{fmt.lower()}": _save(_pixels(seed), fmt) for fmt, seed in OTHER.items()}
    files["noise.jpg"] = np.random.default_rng(9).bytes(400)
    files["drawing.jpg"] = EPS
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    batch = pa.table({"uri": [str(tmp_path / n) for n in files]})

    default = fetch_decode_batch(batch, data_config=CFG).to_pydict()
    assert default["error_type"] == ["UnsupportedFormat"] * 3 + ["NotAnImage", "UnsupportedFormat"]
    for fmt, msg in zip(OTHER, default["error_message"]):
        assert f"format {fmt} " in msg and "--formats" in msg

    wider = fetch_decode_batch(batch, data_config=CFG, formats=("TGA", "JPEG2000", "PPM", "JPEG")).to_pydict()
    assert wider["error_type"] == [None] * 3 + ["NotAnImage", "UnsupportedFormat"]
    assert all(p is not None and len(p) == 3 * 32 * 32 for p in wider["pixels"][:3])

    with pytest.raises(ValueError, match="Ghostscript"):
        fetch_decode_batch(batch, data_config=CFG, formats=("JPEG", "EPS"))


def _embed_argv(tmp_path, *extra):
    return ["embed", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "resnet18", "--allow-empty-source", *extra]


@pytest.mark.parametrize("value, needle", [("jpeg,XYZ", "got 'XYZ'"), ("png,eps", "Ghostscript"), (",", "non-empty")])
def test_bad_formats_option_is_one_line_and_exit_2(tmp_path, capsys, value, needle):
    with pytest.raises(SystemExit) as e:
        main(_embed_argv(tmp_path, "--formats", value))
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "argument --formats" in errors[0] and needle in errors[0], errors
    if needle.startswith("got"):
        assert "JPEG2000" in errors[0] and "TGA" in errors[0], "the accepted names are listed"


def _capture_embed_config(monkeypatch) -> list:
    from sparse_embed.pipeline.embed import report, run

    seen = []
    monkeypatch.setattr(run, "run_embed", lambda cfg: seen.append(cfg) or {"error_rate": 0.0, "counts": {}})
    monkeypatch.setattr(report, "summary", lambda result: "")
    return seen


def test_cli_formats_reach_the_embed_config(tmp_path, monkeypatch):
    seen = _capture_embed_config(monkeypatch)
    assert main(_embed_argv(tmp_path, "--formats", "tga,Jpeg2000")) == 0
    assert main(_embed_argv(tmp_path)) == 0
    assert [cfg.formats for cfg in seen] == [("TGA", "JPEG2000"), ALLOWED_FORMATS]


def test_nightly_formats_are_validated_and_reach_the_embed_config(tmp_path, monkeypatch):
    import yaml

    from sparse_embed.jobs.nightly_config import parse

    base = {"source": str(tmp_path), "out": str(tmp_path / "out"), "model": "resnet10t"}
    assert parse(base).formats == list(ALLOWED_FORMATS)
    for bad, needle in [(["TGA", "nope"], "got 'nope'"), (["EPS"], "Ghostscript"), ("TGA", "expected a list")]:
        with pytest.raises(ValueError) as e:
            parse(base | {"formats": bad})
        assert str(e.value).startswith("nightly config field 'formats': ") and needle in str(e.value)

    seen = _capture_embed_config(monkeypatch)
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(base | {"formats": ["tga", "PPM"], "allow_empty_source": True}))
    assert main(["nightly", "--config", str(config)]) == 0
    assert seen[0].formats == ("TGA", "PPM")


def test_search_queries_pass_the_same_guards_with_the_default_formats(tmp_path, monkeypatch):
    """embed_queries decodes with the default formats: a PNG query embeds; a TGA, an EPS or
    random bytes are a ValueError naming the query (the CLI prints it in one line, exit 2)."""
    from sparse_embed.pipeline.embed import actor
    from sparse_embed.pipeline.index.searcher import embed_queries

    class StubActor:  # the real one builds the encoder; only its data_config and embed_pixels are used
        def __init__(self, spec, expected_version):
            self.encoder = type("E", (), {"data_config": CFG})()

        def embed_pixels(self, pixels):
            return [[float(len(p))] for p in pixels]

    monkeypatch.setattr(actor, "EmbedActor", StubActor)
    manifest = {"encoder": {"spec": {}, "model_version": "v"}}
    ok = tmp_path / "q.png"
    ok.write_bytes(_save(_pixels(5), "PNG"))
    assert embed_queries([str(ok)], manifest).tolist() == [[3 * 32 * 32]]
    for name, data, needle in [("q.tga", _save(_pixels(6), "TGA"), "got TGA in"), ("q.eps", EPS, "got EPS in"),
                               ("q.jpg", np.random.default_rng(11).bytes(300), "NotAnImage")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=needle) as e:
            embed_queries([str(tmp_path / name)], manifest)
        assert name in str(e.value)

"""The search server's JSON API against a real index: generated images on the real local S3
server, embedded by the real embed job (resnet10t on a local Ray), served by the aiohttp app
on a loopback port and called over HTTP."""
from __future__ import annotations

import io
import json
import time

import pytest
import requests

from helpers import SPEC
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.jobs.demo import corrupt_objects
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.index.build import BuildConfig, build_index
from sparse_embed.pipeline.index.searcher import ShardedIndex, current_index_id
from sparse_embed.pipeline.serve.access import AccessPolicy
from sparse_embed.pipeline.serve.app import build_app
from sparse_embed.pipeline.serve.decode_slots import DecodeSlots
from sparse_embed.pipeline.serve.live_index import LiveIndex
from sparse_embed.pipeline.serve.runner import BackgroundServer
from sparse_embed.pipeline.store import live, storage, tables

pytestmark = pytest.mark.integration

N_BASE = 8  # 40 images: small enough for a 2-core CI machine, enough for a top-10 to mean something


@pytest.fixture(scope="module")
def indexed(object_store, ray_local):
    bucket = object_store.create_bucket("serve-api")
    source, out = f"{bucket}/images/", f"{bucket}/emb"
    images = generate(N_BASE, seed=11)
    storage.put_many(source, {im.key: im.data for im in images} | corrupt_objects(1))
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2))
    t = live.read_live(tables.table_uri(out, tables.EMBEDDINGS), ["image_id", "uri"])
    ids = dict(zip(t.column("uri").to_pylist(), t.column("image_id").to_pylist()))
    return {"source": source, "out": out, "index": f"{out}/index", "images": images, "ids": ids}


class Client:
    """requests against the server, every response kept for the credential scan."""

    def __init__(self, url: str):
        self.url, self.responses = url, []

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        r = requests.request(method, self.url.rstrip("/") + path, timeout=120, **kw)
        self.responses.append(r)
        return r

    def search(self, **kw) -> requests.Response:
        return self("POST", "/api/search", **kw)


@pytest.fixture(scope="module")
def server(indexed, tmp_path_factory):
    live = LiveIndex(indexed["index"], check_every_s=3600)  # this module's reload test runs its own server
    live.load()
    with BackgroundServer(build_app(live, max_upload_bytes=200_000, thumb_cache_dir=tmp_path_factory.mktemp("thumbs"))) as srv:
        yield Client(srv.url)


def test_status_names_the_index_it_serves(indexed, server):
    r = server("GET", "/api/status")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    s = r.json()
    manifest = ShardedIndex.open(indexed["index"]).manifest
    assert s["index_id"] == current_index_id(indexed["index"])
    assert s["ntotal"] == len(indexed["ids"]) == 5 * N_BASE  # the corrupt object is an error row, not a vector
    assert (s["model"], s["model_version"]) == ("resnet10t", manifest["model_version"])
    assert s["table_version"] == tables.version_of(tables.table_uri(indexed["out"], tables.EMBEDDINGS))
    assert s["built_at"] == manifest["build"]["created_at"] and s["can_embed_uploads"] is True


def test_search_by_image_id_finds_itself_first_then_the_rest_by_score(indexed, server):
    base_uri = indexed["source"] + "base/img_00003.png"
    r = server.search(json={"image_id": indexed["ids"][base_uri], "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"kind": "image_id", "image_id": indexed["ids"][base_uri], "uri": base_uri}
    hits = body["results"]
    assert len(hits) == 10 and [h["rank"] for h in hits] == list(range(1, 11))
    assert hits[0]["uri"] == base_uri and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(indexed["ids"][h["uri"]] == h["image_id"] for h in hits)
    assert body["index_id"] == current_index_id(indexed["index"]) and body["model"] == "resnet10t"


def test_search_by_uri_equals_search_by_its_image_id(indexed, server):
    uri = indexed["source"] + "variants/crop/img_00005.jpg"
    by_uri = server.search(json={"uri": uri, "k": 7}).json()
    by_id = server.search(data={"image_id": str(indexed["ids"][uri]), "k": "7"}).json()  # a form works too
    assert by_uri["results"] == by_id["results"] and by_uri["query"]["image_id"] == indexed["ids"][uri]


def test_an_uploaded_variant_finds_its_base(indexed, server):
    im = next(i for i in indexed["images"] if i.kind == "brightness" and i.base_key == "base/img_00003.png")
    r = server.search(files={"image": ("query.jpg", im.data, "image/jpeg")}, data={"k": "5"})
    assert r.status_code == 200, r.text
    uris = [h["uri"] for h in r.json()["results"]]
    assert indexed["source"] + im.key in uris and indexed["source"] + im.base_key in uris, uris
    # The upload path embeds like the job: a base's own bytes find that base at score ~1.
    base = next(i for i in indexed["images"] if i.key == "base/img_00002.jpg")  # under the 200 KB limit
    raw = server("POST", "/api/search?k=3", data=base.data, headers={"Content-Type": "image/jpeg"}).json()
    assert raw["results"][0]["uri"] == indexed["source"] + base.key
    assert raw["results"][0]["score"] == pytest.approx(1.0, abs=1e-4) and raw["query"] == {"kind": "upload",
                                                                                         "bytes": len(base.data)}


def test_thumbnails_are_bounded_jpegs_of_indexed_objects(indexed, server):
    from PIL import Image

    image_id = indexed["ids"][indexed["source"] + "base/img_00000.jpg"]
    r = server("GET", f"/api/thumb/{image_id}")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert (img.format, img.size) == ("JPEG", (256, 256)) and len(r.content) < 64_000


@pytest.mark.parametrize("path,status", [
    ("/api/thumb/999999", 404),  # not in the index
    ("/api/thumb/-1", 400),
    ("/api/thumb/abc", 400),
    ("/api/thumb/..%2F..%2Fetc%2Fpasswd", 400),
    ("/api/nothing", 404),
])
def test_thumbnails_outside_the_index_are_refused_in_words(server, path, status):
    r = server("GET", path)
    assert r.status_code == status and r.headers["Content-Type"].startswith("application/json")
    assert len(r.json()["error"]) > 20


def test_static_files_never_reach_outside_their_folder(server):
    assert server("GET", "/static/app.js").status_code == 200
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2Fapp.py"):
        r = server("GET", path)
        assert r.status_code in (403, 404) and "build_app" not in r.text, path


@pytest.mark.parametrize("body,status,needle", [
    ({"uri": "s3://elsewhere/secret.jpg"}, 404, "is not in index"),
    ({"image_id": 10 ** 9}, 404, "is not in index"),
    ({"image_id": 1, "k": 0}, 400, "k from 1 to 200"),
    ({"image_id": 1, "k": 201}, 400, "k from 1 to 200"),
    ({"image_id": 1, "uri": "s3://x/y.jpg"}, 400, "exactly one of"),
    ({}, 400, "exactly one of"),
    ({"image_id": 1, "path": "/etc/passwd"}, 400, "unknown 'path'"),
])
def test_bad_searches_are_refused_in_words(server, body, status, needle):
    r = server.search(json=body)
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_a_uri_in_the_bucket_but_not_in_the_index_is_404(indexed, server):
    corrupt = indexed["source"] + "broken/truncated.jpg"  # listed, an error row, never indexed
    assert storage.exists(corrupt)
    r = server.search(json={"uri": corrupt})
    assert r.status_code == 404 and "is not in index" in r.json()["error"]


def test_uploads_pass_the_decode_guards(server):
    from PIL import Image

    too_big = b"\x89PNG" + bytes(300_000)
    r = server.search(files={"image": ("big.png", too_big, "image/png")})
    assert r.status_code == 413 and "limit of 200,000 bytes" in r.json()["error"], r.text
    r = server.search(files={"image": ("page.jpg", b"<html>not an image</html>", "image/jpeg")})
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    r = server.search(files={"image": ("x.eps", eps, "image/jpeg")})
    assert r.status_code == 415 and "EPS" in r.json()["error"]
    tga = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tga, "TGA")
    r = server.search(files={"image": ("x.tga", tga.getvalue(), "image/x-tga")})
    assert r.status_code == 415 and "TGA" in r.json()["error"]
    r = server.search(files={"image": ("bomb.png", _png_declaring(20000, 20000), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["error"], r.text


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one tiny IDAT: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_the_page_is_served_with_a_strict_policy(server):
    r = server("GET", "/")
    assert r.status_code == 200 and "<title>sparse-embed search</title>" in r.text
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_a_thumbnail_of_an_object_over_the_size_cap_is_422_without_reading_it_whole(indexed, tmp_path):
    """An indexed object on S3 larger than the server's --max-object-mb: 422 in words."""
    uri = indexed["source"] + "base/img_00001.png"
    size = storage.filesystem(uri).info(storage.strip_scheme(uri))["size"]
    live = LiveIndex(indexed["index"], check_every_s=3600)
    live.load()
    with BackgroundServer(build_app(live, max_object_bytes=size - 1, thumb_cache_dir=tmp_path / "thumbs")) as srv:
        client = Client(srv.url)
        r = client("GET", f"/api/thumb/{indexed['ids'][uri]}")
        assert r.status_code == 422 and "too large to show" in r.json()["error"], r.text
        small = min(indexed["ids"], key=lambda u: storage.filesystem(u).info(storage.strip_scheme(u))["size"])
        assert client("GET", f"/api/thumb/{indexed['ids'][small]}").status_code == 200


def test_a_request_that_took_the_old_index_answers_from_it_across_a_swap(indexed, object_store, monkeypatch):
    """A search by URI is held inside its lookup while a new index is published and the
    server loads it: requests after the swap get the new index, and the held request
    answers from the index it took (its index_id, its hits)."""
    import threading

    from sparse_embed.pipeline.serve import search as search_mod

    live = LiveIndex(indexed["index"], check_every_s=0.2)
    old = live.load()
    uri = indexed["source"] + "variants/crop/img_00005.jpg"
    entered, go = threading.Event(), threading.Event()
    real_lookup = search_mod.image_id_of_uri

    def held_lookup(index, u):
        entered.set()
        assert go.wait(120), "the test never released the held request"
        return real_lookup(index, u)

    monkeypatch.setattr(search_mod, "image_id_of_uri", held_lookup)
    with BackgroundServer(build_app(live)) as srv:
        client = Client(srv.url)
        held: dict = {}
        t = threading.Thread(target=lambda: held.update(r=client.search(json={"uri": uri, "k": 5})), daemon=True)
        t.start()
        assert entered.wait(60), "the search never reached its lookup"
        manifest = build_index(BuildConfig(f"{indexed['out']}/embeddings", indexed["index"], shards=1))
        assert manifest["index_id"] != old.index_id and current_index_id(indexed["index"]) == manifest["index_id"]
        deadline = time.monotonic() + 30
        while client("GET", "/api/status").json()["index_id"] != manifest["index_id"]:
            assert time.monotonic() < deadline, "the server never loaded the new CURRENT"
            time.sleep(0.1)
        image_id = indexed["ids"][uri]
        after = client.search(json={"image_id": image_id, "k": 5}).json()
        assert after["index_id"] == manifest["index_id"]
        assert t.is_alive() and "r" not in held, "the held request is still inside its lookup"
        go.set()
        t.join(60)
        body = held["r"].json()
        assert held["r"].status_code == 200, body
        assert body["index_id"] == old.index_id != after["index_id"], "the held request answers from the index it took"
        assert body["results"][0]["uri"] == uri and body["query"]["image_id"] == image_id
        assert [h["uri"] for h in body["results"]] == [h["uri"] for h in after["results"]], "same table, same hits"
        _assert_no_credentials(client.responses, object_store)


def test_no_response_carries_a_credential(indexed, object_store):
    """Every kind of response (found, not found, refused, a store error) of a server of its
    own: none carries the store's access key or secret."""
    live = LiveIndex(indexed["index"], check_every_s=3600)
    live.load()
    gone = indexed["source"] + "base/img_00007.png"
    gone_id = indexed["ids"][gone]
    with BackgroundServer(build_app(live, max_upload_bytes=200_000)) as srv:
        client = Client(srv.url)
        image_id = next(iter(indexed["ids"].values()))
        for path in ("/", "/api/status", f"/api/thumb/{image_id}", "/api/thumb/999999", "/api/thumb/abc", "/api/x",
                     "/static/app.js", "/static/../app.py"):
            client("GET", path)
        for body in ({"image_id": image_id}, {"uri": gone}, {"uri": "s3://elsewhere/x.jpg"}, {"image_id": -5}, {}):
            client.search(json=body)
        client.search(files={"image": ("x.jpg", b"<html>not an image</html>", "image/jpeg")})
        client.search(files={"image": ("big.png", b"\x89PNG" + bytes(300_000), "image/png")})
        data = storage.filesystem(gone).cat_file(storage.strip_scheme(gone))
        storage.filesystem(gone).rm_file(storage.strip_scheme(gone))  # indexed, then gone from the store
        try:
            r = client("GET", f"/api/thumb/{gone_id}")
            assert r.status_code >= 400 and len(r.json()["error"]) > 20, r.text
        finally:
            storage.put_many(indexed["source"], {"base/img_00007.png": data})
        assert {r.status_code for r in client.responses} >= {200, 400, 404, 413, 415}
        _assert_no_credentials(client.responses, object_store)


def _assert_no_credentials(responses, object_store):
    secrets = [object_store.secret_key, object_store.access_key]
    for r in responses:
        text = r.content.decode("latin-1") + json.dumps(dict(r.headers))
        assert not [s for s in secrets if s in text], f"{r.request.method} {r.url} carries a credential"


@pytest.mark.slow
def test_demo_serve_leaves_the_page_running_and_prints_its_address(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo starts its own store
    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "demo", "--images", "4", "--model", "resnet10t",
                             "--serve", "--serve-port", "0", "--contact-sheet", str(tmp_path / "sheet.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[demo] search page: "):
                break
        url = lines[-1].split()[3]
        assert url.startswith("http://127.0.0.1:"), lines[-5:]
        status = requests.get(url + "api/status", timeout=60).json()
        assert status["ntotal"] == 20 and status["model"] == "resnet10t"
        assert "<title>sparse-embed search</title>" in requests.get(url, timeout=60).text
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "[demo] search page stopped" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()


def _port(client: Client) -> int:
    return int(client.url.rstrip("/").rsplit(":", 1)[1])


def test_a_foreign_host_or_origin_is_refused_while_the_servers_own_names_work(indexed, server):
    """DNS rebinding sends the attacker's name in Host; a cross-site form or script sends its
    page in Origin: both 403 in words, while the server's own names answer."""
    port = _port(server)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert server("GET", "/api/status", headers={"Host": host}).status_code == 200, host
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{port + 1}"):
        r = server("GET", "/api/status", headers={"Host": host})
        assert r.status_code == 403 and "does not answer to the host" in r.json()["error"], (host, r.text)
        assert server("GET", "/api/thumb/0", headers={"Host": host}).status_code == 403
    query = {"json": {"image_id": next(iter(indexed["ids"].values())), "k": 2}}
    r = server.search(headers={"Origin": "http://attacker.example"}, **query)
    assert r.status_code == 403 and "search from this server's own page" in r.json()["error"], r.text
    assert server.search(headers={"Origin": f"http://127.0.0.1:{port}"}, **query).status_code == 200
    assert server.search(**query).status_code == 200, "a client that sends no Origin (curl, scripts) is served"


def test_beyond_loopback_a_token_is_required_and_carried_by_header_or_cookie(indexed, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sparse_embed.jobs.cli", "serve", "--index", indexed["index"],
                           "--host", "0.0.0.0", "--allowed-host", "127.0.0.1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs --token-file" in done.stderr, done.stderr
    token = "t" * 12 + "-secret-token"
    live = LiveIndex(indexed["index"], check_every_s=3600)
    live.load()
    access = AccessPolicy.for_listener("0.0.0.0", allowed_hosts=["127.0.0.1"], token=token)
    with BackgroundServer(build_app(live, access=access, thumb_cache_dir=tmp_path / "thumbs"), host="0.0.0.0") as srv:
        port = srv.url.rstrip("/").rsplit(":", 1)[1]
        client = Client(f"http://127.0.0.1:{port}/")
        r = client("GET", "/api/status")
        assert r.status_code == 401 and "needs its token" in r.json()["error"], r.text
        assert client("GET", "/api/status", headers={"Authorization": "Bearer wrong-token-of-some-length"}).status_code == 401
        assert client("GET", "/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client("GET", "/").status_code == 200, "the page itself is static"
        with requests.Session() as browser:  # the link with the token sets a cookie and leaves the address
            r = browser.get(f"http://127.0.0.1:{port}/?token={token}", timeout=60)
            assert r.status_code == 200 and r.url == f"http://127.0.0.1:{port}/", r.url
            cookie = browser.cookies.get("sparse_embed_token")
            assert cookie == token
            image_id = next(iter(indexed["ids"].values()))
            assert browser.get(f"http://127.0.0.1:{port}/api/thumb/{image_id}", timeout=60).status_code == 200
            assert browser.get(f"http://127.0.0.1:{port}/?token=not-the-token-at-all", timeout=60).status_code == 401


def test_images_over_the_serving_pixel_limit_are_refused_in_words_and_the_server_goes_on(indexed, tmp_path):
    from PIL import Image

    live = LiveIndex(indexed["index"], check_every_s=3600)
    live.load()
    with BackgroundServer(build_app(live, max_pixels=1000, thumb_cache_dir=tmp_path / "thumbs")) as srv:
        client = Client(srv.url)
        image_id = next(iter(indexed["ids"].values()))
        r = client("GET", f"/api/thumb/{image_id}")
        assert r.status_code == 422 and "too many pixels" in r.json()["error"] and "1,000" in r.json()["error"], r.text
        upload = io.BytesIO()
        Image.new("RGB", (40, 40), (10, 200, 10)).save(upload, "PNG")
        r = client.search(files={"image": ("x.png", upload.getvalue(), "image/png")})
        assert r.status_code == 413 and "at most 1,000" in r.json()["error"], r.text
        assert client.search(json={"image_id": image_id, "k": 3}).status_code == 200
        assert client("GET", "/api/status").status_code == 200


def test_a_full_decode_queue_answers_503_with_retry_after(indexed, tmp_path):
    from PIL import Image

    live = LiveIndex(indexed["index"], check_every_s=3600)
    live.load()
    slots = DecodeSlots(running=1, waiting=0)
    with BackgroundServer(build_app(live, decodes=slots, thumb_cache_dir=tmp_path / "thumbs")) as srv:
        client = Client(srv.url)
        upload = io.BytesIO()
        Image.new("RGB", (40, 40), (10, 200, 10)).save(upload, "PNG")
        image_id = next(iter(indexed["ids"].values()))
        slots.held = 1  # one decode running, no place to wait
        r = client.search(files={"image": ("x.png", upload.getvalue(), "image/png")})
        assert r.status_code == 503 and r.headers["Retry-After"] == "2" and "busy" in r.json()["error"], r.text
        assert client("GET", f"/api/thumb/{image_id}").status_code == 503, "an uncached thumbnail decodes too"
        assert client.search(json={"image_id": image_id, "k": 3}).status_code == 200, "searches by id decode nothing"
        slots.held = 0
        assert client.search(files={"image": ("x.png", upload.getvalue(), "image/png")}).status_code == 200
        assert client("GET", f"/api/thumb/{image_id}").status_code == 200
        slots.held = 1
        assert client("GET", f"/api/thumb/{image_id}").status_code == 200, "a cached thumbnail decodes nothing"


def test_workers_share_one_port_and_stop_together(indexed):
    """`serve --workers 2`: both processes answer on one port; SIGTERM stops them all, exit 0."""
    import os
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.jobs.cli", "serve", "--index", indexed["index"],
                             "--port", "0", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving index ") and "with 2 workers" in first, first + proc.stderr.read()
        url = first.split(" at ", 1)[1].split()[0]
        children = {int(p) for p in re.search(r"pids ([\d, ]+)\)", first).group(1).split(", ")}
        answered = set()
        for _ in range(40):  # a new connection each time: the kernel spreads them over the workers
            r = requests.get(f"{url}api/status", timeout=60, headers={"Connection": "close"})
            assert r.status_code == 200
            answered.add(r.json()["worker_pid"])
        assert answered == children and len(children) == 2, (answered, children)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out.strip().splitlines()[-1] == "stopped (SIGTERM)", (out, err)
    for pid in children:
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the supervisor
            os.kill(pid, 0)

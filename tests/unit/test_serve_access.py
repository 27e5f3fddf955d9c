"""The server's access rules and decode bound as pure objects (the HTTP side is in
integration/test_serve_api.py)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from sparse_embed.pipeline.serve.access import AccessPolicy, host_and_port, read_token_file
from sparse_embed.pipeline.serve.decode_slots import DecodeSlots
from sparse_embed.pipeline.serve.requests import RequestError

TOKEN = "0123456789abcdef-token"


def _request(host, *, method="GET", path="/api/status", origin=None, auth=None, cookie=None):
    headers = {k: v for k, v in (("Origin", origin), ("Authorization", auth)) if v is not None}
    return SimpleNamespace(host=host, method=method, path=path, headers=headers,
                           cookies={"sparse_embed_token": cookie} if cookie else {})


def test_host_and_port_parse_names_addresses_and_ipv6():
    assert host_and_port("LocalHost:8080") == ("localhost", 8080)
    assert host_and_port("[::1]:81") == ("::1", 81)
    assert host_and_port("example.org") == ("example.org", None)
    assert host_and_port("example.org:notaport") == ("", None)


def test_loopback_policy_admits_its_names_on_its_port_only():
    policy = AccessPolicy.for_listener("127.0.0.1")
    policy.port = 8080
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "localhost"):
        policy.check(_request(host))
    for host in ("rebound.example:8080", "127.0.0.1:9090", "", "127.0.0.1.evil.example:8080"):
        with pytest.raises(RequestError) as e:
            policy.check(_request(host))
        assert e.value.status == 403
    policy.check(_request("127.0.0.1:8080", method="POST", origin="http://127.0.0.1:8080"))
    policy.check(_request("localhost:8080", method="POST", origin="http://localhost:8080"))
    for origin in ("http://evil.example", "http://127.0.0.1:9090", "null", "file://"):
        with pytest.raises(RequestError):
            policy.check(_request("127.0.0.1:8080", method="POST", origin=origin))


def test_beyond_loopback_the_token_and_a_name_are_required():
    with pytest.raises(ValueError, match="needs --token-file"):
        AccessPolicy.for_listener("10.0.0.5")
    with pytest.raises(ValueError, match="needs --allowed-host"):
        AccessPolicy.for_listener("0.0.0.0", token=TOKEN)
    policy = AccessPolicy.for_listener("0.0.0.0", allowed_hosts=["search.internal"], token=TOKEN)
    assert policy.hosts == {"search.internal"}
    with pytest.raises(RequestError) as e:
        policy.check(_request("search.internal"))
    assert e.value.status == 401
    policy.check(_request("search.internal", auth=f"Bearer {TOKEN}"))
    policy.check(_request("search.internal", cookie=TOKEN))
    policy.check(_request("search.internal", path="/"))  # the static page needs no token
    with pytest.raises(RequestError):
        policy.check(_request("search.internal", auth=f"Bearer {TOKEN}x"))
    assert AccessPolicy.for_listener("10.0.0.5", token=TOKEN).hosts == {"10.0.0.5"}


def test_token_file_must_hold_a_long_token(tmp_path):
    good, short = tmp_path / "good", tmp_path / "short"
    good.write_text(TOKEN + "\n")
    short.write_text("abc")
    assert read_token_file(str(good)) == TOKEN
    with pytest.raises(ValueError, match="at least 16"):
        read_token_file(str(short))
    with pytest.raises(ValueError, match="Cannot read --token-file"):
        read_token_file(str(tmp_path / "missing"))


def test_decode_slots_run_some_queue_some_and_refuse_the_rest():
    async def scenario():
        slots = DecodeSlots(running=1, waiting=1)
        release = asyncio.Event()
        order = []

        async def work(name):
            async with slots.slot():
                order.append(name)
                await release.wait()

        first = asyncio.create_task(work("first"))
        second = asyncio.create_task(work("second"))
        await asyncio.sleep(0.01)
        assert order == ["first"] and slots.held == 2  # one running, one waiting
        with pytest.raises(RequestError) as e:
            async with slots.slot():
                pass
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "2"}
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and slots.held == 0

    asyncio.run(scenario())

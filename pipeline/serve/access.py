"""Who may use the server, checked on every request before any handler runs:

- Host: the Host header must name this server: 127.0.0.1, localhost or ::1 when it listens
  on loopback, else the --host name, plus every --allowed-host; and the port it listens
  on. A page on another site that rebinds its own name to this address (DNS rebinding)
  sends its own name, and is refused.
- Origin: a POST whose Origin header is present must come from the page this server
  serves (Origin's host and port equal the Host header's), so another site's form or
  script cannot search through the browser of someone who can reach the server.
- Token (--token-file, required when listening beyond loopback): every request but the
  page's static files carries it, as `Authorization: Bearer <token>` or as the cookie
  that opening the page once with `?token=<token>` sets (HttpOnly, SameSite=Strict).
Each refusal is a RequestError (403, or 401 for the token) with one sentence.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from .requests import RequestError

TOKEN_COOKIE = "sparse_embed_token"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_and_port(value: str) -> tuple[str, int | None]:
    """("name", port) of a Host header or an Origin's netloc ("[::1]:8080" -> ("::1", 8080))."""
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number
        return "", None


@dataclass
class AccessPolicy:
    """The names the Host header may carry, the listening port (set once bound) and the token."""

    hosts: frozenset
    token: str | None = None
    port: int | None = field(default=None)

    @classmethod
    def for_listener(cls, host: str, *, allowed_hosts=(), token: str | None = None) -> "AccessPolicy":
        """The policy of a server listening on `host`; a wildcard address (0.0.0.0, ::) has no
        name of its own, so it needs --allowed-host."""
        names = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        if is_loopback(host):
            names |= LOOPBACK_NAMES
        elif host in WILDCARD_HOSTS:
            if not names:
                raise ValueError(f"Listening on {host or 'every address'} needs --allowed-host NAME: the name clients "
                                 f"use to reach this server (the Host header is checked against it)")
        else:
            names.add(host.lower().strip("[]"))
        if not is_loopback(host) and not token:
            raise ValueError(f"Listening on {host} needs --token-file: anyone who can reach the address could "
                             f"search the index and see its images; write a long random token to a file and pass it")
        return cls(frozenset(names), token)

    def check(self, request) -> None:
        """Raise RequestError unless the request passes the Host, Origin and token checks."""
        name, port = host_and_port(request.host or "")
        if name not in self.hosts or (self.port is not None and port not in (self.port, None)):
            raise RequestError(403, f"This server does not answer to the host {request.host!r}: use "
                                    f"{' or '.join(sorted(self.hosts))}{f' port {self.port}' if self.port else ''}, "
                                    f"or start it with --allowed-host NAME")
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin is not None:
            o = urlsplit(origin)
            if o.scheme not in ("http", "https") or host_and_port(o.netloc) != (name, port):
                raise RequestError(403, f"Requests from the page at {origin!r} are refused: search from this "
                                        f"server's own page")
        if self.token and not request.path.startswith("/static/") and request.path != "/":
            if not self.token_matches(request):
                raise RequestError(401, "This server needs its token: open the page once as /?token=TOKEN, or send "
                                        "the header 'Authorization: Bearer TOKEN'")

    def token_matches(self, request) -> bool:
        header = request.headers.get("Authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())


ACCESS = web.AppKey("access", AccessPolicy)  # the app's policy; the runner sets its port once bound


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace dropped); at least 16 characters."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"Cannot read --token-file {path}: {e.strerror or e}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"The token in {path} must be at least 16 characters without spaces: write one with "
                         f"`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > {path}`")
    return token

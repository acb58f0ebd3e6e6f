"""What keeps `klong ui` driven by its user alone, not by a web page the user happens to have open.

- `HostGuard` (ASGI middleware): a request whose `Host` header is not the viewer's own name (127.0.0.1,
  localhost, [::1], or the `--host` value), with or without a port, is refused (421). A page on another
  site that rebinds its DNS name to 127.0.0.1 sends its own name as Host, so it can read nothing.
- `check_same_origin`: a request that runs a query (the SQL box) must come from the viewer's own page:
  a POST with the per-process token the page's form carries (`new_token`: another site cannot read it),
  and, where the browser says where it comes from (`Origin`, `Sec-Fetch-Site`), from this origin.
  Pages are GETs that change nothing; the SQL box is never a GET, so an `<img src=...>` cannot run it.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Iterable

from schemas.errors import TerminalError

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


class Forbidden(TerminalError):
    """A request the viewer refuses: a foreign Host, another origin, a missing or wrong token."""


def host_name(header: str) -> str:
    """The name part of a Host header: `localhost:8765` -> `localhost`, `[::1]:8765` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(host: str) -> frozenset[str]:
    """The Host names a viewer bound to `host` answers to."""
    names = set(LOCAL_NAMES)
    if host and host not in ("0.0.0.0", "::"):  # a wildcard bind names no host: only the local names
        names.add(host.strip("[]").lower())
    return frozenset(names)


class HostGuard:
    """ASGI middleware: refuses any HTTP request whose Host header names another host (see the module)."""

    def __init__(self, app, hosts: Iterable[str]):
        self.app, self.hosts = app, frozenset(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(raw) in self.hosts:
            return await self.app(scope, receive, send)
        body = (f"klong ui refused this request: Host {raw!r} is not this viewer (it answers to "
                f"{', '.join(sorted(self.hosts))}; start it with --host NAME to add a name)\n").encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def new_token() -> str:
    """A per-process secret the viewer's own forms carry."""
    return secrets.token_urlsafe(32)


def check_same_origin(method: str, headers, token: str, sent: str | None) -> None:
    """Forbidden unless this is a POST from the viewer's own page (see the module docstring)."""
    if method != "POST":
        raise Forbidden("refused: queries run by POST from the viewer's own SQL page")
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        raise Forbidden(f"refused: a cross-origin request (Origin {origin!r}) cannot run queries")
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(f"refused: a {site} request cannot run queries")
    if not sent or not hmac.compare_digest(sent.encode(), token.encode()):
        raise Forbidden("refused: the request lacks this viewer's token (reload the SQL page and submit again)")

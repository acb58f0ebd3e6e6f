"""Network for the local sandbox: none by default; with an allowlist, HTTP(S) through a proxy that
lets through only the allowed hosts.

    hosts = allowed_hosts(["pypi.org", "files.pythonhosted.org"], blacklist=task.blacklist)   # refuses overlaps
    proxy = AllowlistProxy(hosts)            # on a unix socket the sandbox gets bind-mounted
    ... NamespaceSandbox(root, limits, allow_hosts=hosts)   # starts and stops its own proxy

The sandbox keeps its own network namespace (loopback only, no route out). Inside it, a small
forwarder (system python3) listens on 127.0.0.1:3128 and passes each connection to the proxy's unix
socket; HTTP_PROXY / HTTPS_PROXY point there. The proxy (in the runner, outside) reads the request
line (`CONNECT host:port` for HTTPS, an absolute `http://host/...` URL for plain HTTP), refuses any host
not on the allowlist (exact name or a subdomain of it) with 403, and otherwise connects and relays
bytes. A task's blacklisted URLs name paths the proxy cannot see inside TLS, so an allowlist entry
that covers a blacklisted URL's host is refused when the sandbox is configured, not trusted at run time.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Optional

from schemas.errors import ConfigError

PROXY_PORT = 3128  # inside the sandbox: 127.0.0.1:3128
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}\.)*[a-z0-9-]{1,63}$")

# The forwarder run inside the sandbox (holder process): 127.0.0.1:3128 -> the proxy's unix socket.
FORWARDER = r"""
import socket, sys, threading
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
def serve(c):
    u = socket.socket(socket.AF_UNIX)
    try:
        u.connect(sys.argv[1])
    except OSError:
        c.close(); return
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    pipe(u, c)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[2])))
srv.listen(64)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _host_of(entry: str) -> str:
    e = entry.strip().lower()
    e = re.sub(r"^[a-z][a-z0-9+.-]*://", "", e)
    e = e.split("/", 1)[0].split("@")[-1].split(":")[0]
    return e[4:] if e.startswith("www.") else e


def _covers(allowed: str, host: str) -> bool:
    return host == allowed or host.endswith("." + allowed)


def allowed_hosts(hosts: Iterable[str], blacklist: Iterable[str] = ()) -> tuple[str, ...]:
    """Normalised allowlist (host names); ConfigError for a malformed entry or one that would let the
    sandbox reach a blacklisted URL's host."""
    out = []
    banned = {_host_of(u) for u in blacklist if u.strip()}
    for h in hosts:
        name = _host_of(h)
        if not _HOST.fullmatch(name):
            raise ConfigError(f"--allow-host {h!r} is not a host name")
        hit = sorted(b for b in banned if _covers(name, b) or _covers(b, name))
        if hit:
            raise ConfigError(f"--allow-host {h!r} would reach the task's blacklisted {hit[0]!r}: refused")
        out.append(name)
    return tuple(dict.fromkeys(out))


class AllowlistProxy:
    """A CONNECT / absolute-URL HTTP proxy on a unix socket that reaches only `hosts` (see module doc)."""

    def __init__(self, hosts: Iterable[str]):
        self.hosts = tuple(hosts)
        # A directory the sandbox's unprivileged uid can traverse (0711): bwrap binds the socket by path.
        self._dir = Path(tempfile.mkdtemp(prefix="klong-net-"))
        os.chmod(self._dir, 0o711)
        self.path = str(self._dir / "proxy.sock")
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(self.path)
        os.chmod(self.path, 0o666)
        self._srv.listen(64)
        self.refused: list[str] = []
        threading.Thread(target=self._accept, name="klong-sandbox-proxy", daemon=True).start()

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(_covers(a, host) for a in self.hosts)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target = (line.split(" ") + ["", ""])[:2]
            if method.upper() == "CONNECT":
                host, _, port = target.rpartition(":")
                rest = b""
            else:
                m = re.match(r"^http://([^/:]+)(?::(\d+))?(/.*)?$", target, re.I)
                if not m:
                    return self._reply(conn, 400, "the sandbox proxy needs CONNECT or an absolute http:// URL")
                host, port = m[1], m[2] or "80"
                rest = head.replace(target.encode("latin-1"), (m[3] or "/").encode("latin-1"), 1)
            host = host.strip("[]")
            if not self.allows(host):
                self.refused.append(host)
                return self._reply(conn, 403, f"{host} is not on the sandbox's allowlist")
            up = socket.create_connection((host, int(port)), timeout=30)
            up.settimeout(None)
            if method.upper() == "CONNECT":
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up.sendall(rest)
            t = threading.Thread(target=_pipe, args=(conn, up), daemon=True)
            t.start()
            _pipe(up, conn)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _reply(conn: socket.socket, code: int, text: str) -> None:
        body = (text + "\n").encode()
        conn.sendall(f"HTTP/1.1 {code} {'Forbidden' if code == 403 else 'Bad Request'}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)

    def close(self) -> None:
        try:
            self._srv.close()
        finally:
            for p in (Path(self.path), self._dir):
                try:
                    p.unlink() if p.is_socket() else p.rmdir()
                except OSError:
                    pass


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def proxy_env(hosts: Optional[tuple[str, ...]]) -> dict[str, str]:
    """The variables that send HTTP(S) clients in the sandbox through the forwarder."""
    if not hosts:
        return {}
    url = f"http://127.0.0.1:{PROXY_PORT}"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": "", "no_proxy": ""}

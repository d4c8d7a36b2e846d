"""Fetching image URLs without letting a client reach what the server can reach (SSRF) or hold it for long.

Used by the API server (only with ``--allowed-url-fetch``; docs/decisions.md) and by the batch CLI (always, with
`allow_private`: the user's own data). Each fetch:
* takes only ``http``/``https`` URLs without credentials;
* resolves the host itself and refuses every address that is not global unicast (loopback, private, link-local,
  shared/CGNAT, multicast, reserved, unspecified, IPv4-mapped forms of those), unless the host or address is in
  `FetchPolicy.allowed_hosts`; then connects to the checked address (the Host header and TLS server name stay the
  URL's), so a second DNS answer cannot swap in another address between check and connect;
* follows redirects itself, checking every hop the same way;
* never uses proxy or certificate settings from the environment (``trust_env=False``);
* has one deadline for the whole download (not per read) and a size cap counted while streaming, and charges the
  bytes it holds to the request's `limits.Charge` (the server's global in-flight byte budget);
* runs under a concurrency cap; cancelling the awaiting task (the client left) closes the connection.
Errors are `FetchError` with a generic text: no status codes, no connection errors, no addresses (no port-scan
oracle); `detail` carries the reason for the server's log."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from diffgentor.engine.config import DEFAULT_FETCH_DEADLINE_S

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_MAX_REDIRECTS = 3
DEFAULT_FETCH_CONCURRENCY = 8
USER_AGENT = "diffgentor"
# one text for every reason a URL was not fetched (no such host, an internal address, refused, an HTTP error):
# which internal names resolve, or which ports listen, is not the client's to learn
FETCH_FAILED = "the URL could not be fetched (it failed, or its host is not allowed)"


class FetchError(Exception):
    """A URL could not be used. ``str(e)`` is safe to show a client; ``detail`` is for the server's log only."""

    def __init__(self, message: str, detail: str = "", status: int = 400, code: str = "invalid_image_url") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or message
        self.status = status
        self.code = code


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetcher may do. ``allowed_hosts``: host names (exact, case-insensitive), addresses or CIDR networks
    that may be fetched although they are internal (``--allowed-url-hosts``)."""

    max_bytes: int
    deadline_s: float = DEFAULT_FETCH_DEADLINE_S
    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    concurrency: int = DEFAULT_FETCH_CONCURRENCY
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=(), compare=False)

    @classmethod
    def build(cls, max_bytes: int, allowed_hosts: Iterable[str] = (), **kw) -> FetchPolicy:
        names, nets = set(), []
        for h in allowed_hosts:
            h = h.strip().lower().strip("[]")
            if not h:
                continue
            try:
                nets.append(ipaddress.ip_network(h, strict=False))
            except ValueError:
                names.add(h.rstrip("."))
        return cls(max_bytes=max_bytes, allowed_hosts=frozenset(names), networks=tuple(nets), **kw)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allowed_hosts

    def address_allowed(self, ip: IPAddress) -> bool:
        if self.allow_private or not is_internal(ip):
            return True
        forms = [ip] + ([ip.ipv4_mapped] if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else [])
        return any(x in n for x in forms for n in self.networks if x.version == n.version)


def is_internal(ip: IPAddress) -> bool:
    """True for every address a public image URL has no business resolving to."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None and is_internal(mapped):
            return True
    return ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved \
        or ip.is_unspecified or not ip.is_global


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


@dataclass
class _Target:
    scheme: str
    host: str  # as written in the URL (no brackets)
    port: int
    ips: list[str]  # the checked addresses, tried in order
    path: str  # path + query


class UrlFetcher:
    """Fetches URLs under one `FetchPolicy`. ``resolver`` (host, port) -> addresses: the system's by default; tests
    point names at 127.0.0.1 with it. One fetcher per event loop (its concurrency cap belongs to the loop)."""

    def __init__(self, policy: FetchPolicy, resolver: Resolver | None = None) -> None:
        self.policy = policy
        self.resolver = resolver or system_resolver
        self._slots = asyncio.Semaphore(max(1, policy.concurrency))

    async def check(self, url: str) -> _Target:
        """Parse and resolve ``url`` and check its address; FetchError when it may not be fetched."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchError("the URL is not valid", f"unparsable URL {url[:200]!r}") from None
        if parts.scheme not in ("http", "https"):
            raise FetchError("unsupported URL scheme (use http(s):// or data:)", f"scheme {parts.scheme!r}")
        if parts.username is not None or parts.password is not None:
            raise FetchError("URLs with credentials are not accepted", "userinfo in URL")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise FetchError("the URL is not valid", "no host")
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            addrs = await self.resolver(host, port)
        except (OSError, UnicodeError) as e:
            raise FetchError(FETCH_FAILED, f"resolving {host}: {e}") from None
        ips = []
        for a in addrs:
            try:
                ips.append(ipaddress.ip_address(a.split("%", 1)[0]))
            except ValueError:
                continue
        if not ips:
            raise FetchError(FETCH_FAILED, f"{host} has no address")
        if not self.policy.host_allowed(host):
            bad = [str(ip) for ip in ips if not self.policy.address_allowed(ip)]
            if bad:  # any internal answer refuses the host: a round-robin name must not sneak one in
                raise FetchError(FETCH_FAILED, f"{host} resolves to internal {', '.join(bad)}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return _Target(parts.scheme, host, port, [str(ip) for ip in ips], path)

    async def fetch(self, url: str, charge=None) -> bytes:
        """The body of ``url`` (status 200), within the policy's deadline and size cap. ``charge``
        (`limits.Charge`): bytes are charged to it as they arrive."""
        try:
            async with self._slots, asyncio.timeout(self.policy.deadline_s):
                return await self._fetch(url, charge)
        except TimeoutError:
            raise FetchError("the URL could not be fetched in time", f"deadline {self.policy.deadline_s} s") from None

    async def _fetch(self, url: str, charge) -> bytes:
        import httpx  # a declared dependency (pyproject `dependencies`)

        async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                     timeout=httpx.Timeout(self.policy.deadline_s)) as http:
            for _hop in range(self.policy.max_redirects + 1):
                t = await self.check(url)
                r = await self._connect(http, t)
                try:
                    if r.status_code in REDIRECT_STATUSES and r.headers.get("location"):
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise FetchError(FETCH_FAILED, f"HTTP {r.status_code}")
                    return await self._read(r, charge)
                finally:
                    await r.aclose()
            raise FetchError(FETCH_FAILED, "too many redirects")

    async def _connect(self, http, t: _Target):
        """Send the GET to the first checked address that accepts the connection."""
        import httpx

        default = 443 if t.scheme == "https" else 80
        name = f"[{t.host}]" if ":" in t.host else t.host
        host_header = name if t.port == default else f"{name}:{t.port}"
        last: Exception | None = None
        for ip in t.ips:
            ip_host = f"[{ip}]" if ":" in ip else ip
            req = http.build_request("GET", f"{t.scheme}://{ip_host}:{t.port}{t.path}",
                                     headers={"Host": host_header, "User-Agent": USER_AGENT, "Accept": "image/*",
                                              "Accept-Encoding": "identity"},
                                     extensions={"sni_hostname": t.host} if t.scheme == "https" else None)
            try:
                return await http.send(req, stream=True)
            except httpx.ConnectError as e:
                last = e
            except httpx.HTTPError as e:
                raise FetchError(FETCH_FAILED, f"{type(e).__name__}: {e}") from None
        raise FetchError(FETCH_FAILED, f"{type(last).__name__}: {last}")

    async def _read(self, r, charge) -> bytes:
        import httpx

        cap = self.policy.max_bytes
        length = r.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise FetchError(f"the image is larger than {cap} bytes", f"Content-Length {length}", 413,
                             "file_too_large")
        buf = bytearray()
        try:
            async for chunk in r.aiter_raw():
                if len(buf) + len(chunk) > cap:
                    raise FetchError(f"the image is larger than {cap} bytes", "body over the cap", 413,
                                     "file_too_large")
                if charge is not None:
                    charge.add(len(chunk))
                buf += chunk
        except httpx.HTTPError as e:
            raise FetchError(FETCH_FAILED, f"{type(e).__name__}: {e}") from None
        return bytes(buf)


def fetch_sync(url: str, policy: FetchPolicy, resolver: Resolver | None = None) -> bytes:
    """`UrlFetcher.fetch` from synchronous code without a running loop (the batch CLI)."""

    async def go() -> bytes:
        return await UrlFetcher(policy, resolver).fetch(url)

    return asyncio.run(go())


__all__ = ["FetchError", "FetchPolicy", "UrlFetcher", "fetch_sync", "is_internal", "system_resolver"]

"""SSRF-safe fetching of user-supplied URLs: the only code that opens them.

Every hop (the URL itself and each redirect target) is checked before any
connection is made: scheme, no userinfo, the optional host allowlist, and every
address the host resolves to must be public. The connection then goes to the
checked IP itself (no second DNS lookup that an attacker could answer
differently), sending the original Host header and using the original host name
for TLS SNI and certificate verification. Errors and logs name a URL only as
scheme://host/path, because query strings carry SAS tokens.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import certifi
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError, SSLError

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import (
    DeadlineExceeded,
    FetchFailed,
    FetchRefused,
    PayloadTooLarge,
    ServiceError,
)
from medsam2_endpoint.base.log import log

Resolver = Callable[[str, int], list[str]]

#: CA bundle for https; None means certifi's (what requests uses). Tests point it at their own CA.
_CA_CERTS: str | None = None
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HOST_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,15}$")
_CHUNK = 1 << 16
HEAD_BYTES = 64 << 10  # what a caller's check_head sees of a body before the rest is read
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
_SPECIAL = {
    ipaddress.ip_address("169.254.169.254"): "cloud metadata",
    ipaddress.ip_address("fd00:ec2::254"): "cloud metadata",
    ipaddress.ip_address("168.63.129.16"): "cloud metadata (Azure WireServer)",
}
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; also Alibaba's metadata address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4COMPAT = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class FetchPolicy:
    """What fetch_bytes may open. Defaults: public https hosts only, 1 GiB cap, 5 s connect, 30 s read.

    ``allow_networks`` exempts CIDRs from the non-public refusal: for tests and development only.
    ``total_timeout_s`` bounds a whole fetch, so a server dripping bytes cannot hold a worker forever.
    Filled from the MEDSAM2_FETCH_* settings by core/settings.
    """

    allow_http: bool = False
    host_allowlist: tuple[str, ...] = ()
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = 1 << 30
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_redirects: int = 3
    total_timeout_s: float = 300.0


def redact_url(url: str) -> str:
    """The URL as scheme://host[:port]/path: userinfo, query and fragment (where secrets live) dropped."""
    try:
        parts = urllib.parse.urlsplit(str(url).strip())
    except ValueError:
        return "<unparseable URL>"
    hostport = parts.netloc.rpartition("@")[2]
    path = parts.path if len(parts.path) <= 200 else parts.path[:200] + "..."
    shown = f"{parts.scheme}://{hostport}{path}" if parts.scheme or hostport else path
    return re.sub(r"[\x00-\x1f\x7f]", "?", shown)


def default_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for host (IPv4 and IPv6), in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_v4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """An IPv4 address carried inside an IPv6 one, with the name of the embedding."""
    if addr.ipv4_mapped is not None:
        return "IPv4-mapped", addr.ipv4_mapped
    if addr in _NAT64:
        return "NAT64-embedded", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return "6to4-embedded", addr.sixtofour
    if addr.teredo is not None:
        return "Teredo-embedded", addr.teredo[1]
    if addr in _V4COMPAT and int(addr) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def classify_address(ip: str) -> str | None:
    """None if ip is a public unicast address; otherwise why it is refused ("loopback", "private", ...)."""
    try:
        addr = ipaddress.ip_address(str(ip).split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return "not an IP address"
    if addr in _SPECIAL:
        return _SPECIAL[addr]
    if isinstance(addr, ipaddress.IPv6Address) and (embedded := _embedded_v4(addr)) is not None:
        kind, inner = embedded
        reason = classify_address(str(inner))
        if reason is not None:
            return f"{kind} {reason}"
        # Mapped and NAT64 forms really reach the (public) IPv4 host; the tunnel forms are deprecated.
        return None if kind in ("IPv4-mapped", "NAT64-embedded") else f"{kind} (deprecated tunnel)"
    for attr in ("unspecified", "loopback", "link_local", "multicast", "site_local", "reserved", "private"):
        if getattr(addr, f"is_{attr}", False):
            return attr.replace("_", "-")
    if addr in _SHARED:
        return "shared address space (carrier-grade NAT)"
    if not addr.is_global:
        return "special-purpose (not global)"
    return None


@functools.lru_cache(maxsize=32)
def parse_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _exempt(ip: str, policy: FetchPolicy) -> bool:
    """Whether ip falls in the policy's allow_networks (its IPv4-mapped form counts too)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    candidates = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        candidates.append(addr.ipv4_mapped)
    return any(a.version == n.version and a in n for a in candidates for n in parse_networks(policy.allow_networks))


def check_url(
    url: str, policy: FetchPolicy, *, resolver: Resolver = default_resolver, field: str = "url", label: str = "URL"
) -> tuple[urllib.parse.SplitResult, list[str]]:
    """Validate url (scheme, no userinfo, allowlist), resolve its host and refuse non-public addresses.

    Returns the normalised URL parts and the vetted IPs; opens no connection; raises FetchRefused.
    ``label`` names the hop in messages ("URL", "redirect target").
    """
    schemes = ("https", "http") if policy.allow_http else ("https",)
    accepted = f"only public {' or '.join(schemes)} URLs are accepted"
    try:
        parts = urllib.parse.urlsplit(str(url).strip())
        explicit_port = parts.port
    except ValueError:
        raise FetchRefused(f"{field}: {label} {redact_url(url)} is not a valid URL; {accepted}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        got = scheme if _SCHEME_RE.match(scheme) else "no scheme"
        raise FetchRefused(f"{field}: {label} refused: only {' or '.join(schemes)} URLs are accepted (got {got})")
    if "@" in parts.netloc:
        raise FetchRefused(
            f"{field}: {label} refused: URLs with credentials (user:password@host) are not accepted; "
            "grant access with a SAS token in the query string instead"
        )
    host = (parts.hostname or "").rstrip(".")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not _HOST_RE.match(host):
            raise FetchRefused(f"{field}: {label} {redact_url(url)} has no valid host name; {accepted}") from None
    if policy.host_allowlist and not any(fnmatch.fnmatchcase(host, p.lower()) for p in policy.host_allowlist):
        raise FetchRefused(
            f"{field}: {label} host {host} is not allowed; allowed hosts: {', '.join(policy.host_allowlist)}"
        )
    port = explicit_port or (443 if scheme == "https" else 80)
    if literal is not None:
        ips = [str(literal)]
    else:
        try:
            ips = list(dict.fromkeys(str(ip) for ip in resolver(host, port)))
        except (OSError, UnicodeError):
            ips = []
        if not ips:
            raise FetchRefused(f"{field}: {label} host {host} could not be resolved; check the host name")
    for ip in ips:
        reason = classify_address(ip)
        if reason is not None and (reason == "not an IP address" or not _exempt(ip, policy)):
            verb = "is" if literal is not None else "resolves to"
            raise FetchRefused(f"{field}: {label} host {verb} a non-public address ({ip} is {reason}); {accepted}")
    netloc = f"[{host}]" if literal is not None and literal.version == 6 else host
    if explicit_port is not None:
        netloc += f":{explicit_port}"
    # Percent-encode what may not travel raw in a request line (as requests does); keeps existing escapes.
    path, query = (urllib.parse.quote(s, safe=_URL_SAFE) for s in (parts.path, parts.query))
    return parts._replace(scheme=scheme, netloc=netloc, path=path, query=query, fragment=""), ips


@dataclass(frozen=True)
class _Clock:
    """When one fetch must end: the policy's total time-out, or sooner what is left of the request's budget."""

    deadline: float
    budget: Budget | None
    by_budget: bool  # the request's budget, not the fetch time-out, sets the deadline

    @classmethod
    def start(cls, policy: FetchPolicy, budget: Budget | None) -> _Clock:
        now, limit = time.monotonic(), policy.total_timeout_s
        left = budget.remaining() if budget is not None else None
        by_budget = left is not None and left < limit
        return cls(now + (max(0.0, left) if by_budget and left is not None else limit), budget, by_budget)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, policy: FetchPolicy) -> urllib3.Timeout:
        """Per-socket-operation time-outs, never past the deadline (so a stalled read cannot outlive the budget)."""
        left = max(0.05, self.left())
        return urllib3.Timeout(connect=min(policy.connect_timeout_s, left), read=min(policy.read_timeout_s, left))

    def check(self, field: str, shown: str, policy: FetchPolicy, received: int) -> None:
        if self.budget is not None and self.budget.cancelled:
            self.budget.check(received, "bytes_fetched")  # raises Cancelled: a request given up stops reading at once
        if self.left() <= 0:
            raise self.out_of_time(field, shown, policy, received)

    def out_of_time(self, field: str, shown: str, policy: FetchPolicy, received: int) -> ServiceError:
        if self.by_budget and self.budget is not None:
            return DeadlineExceeded(
                f"{field}: the request's time budget of {self.budget.seconds:g} s ran out while fetching {shown} "
                f"({received} bytes received, bytes_fetched={received}); put the file closer to the endpoint, send a "
                "smaller file, or raise MEDSAM2_REQUEST_DEADLINE_S",
                detail={"bytes_fetched": received},
            )
        return _too_slow(field, shown, policy)


def _upstream_error(exc: Exception, field: str, shown: str, host: str, policy: FetchPolicy,
                    clock: _Clock | None = None, received: int = 0) -> Exception:
    """The FetchRefused for a failure while talking to the server. urllib3's own messages may echo
    the request target (with its query), so only the exception's type is shown."""
    if isinstance(exc, ReadTimeoutError):
        if clock is not None and clock.left() <= 0.05:  # the read was cut short by the deadline, not by the server
            return clock.out_of_time(field, shown, policy, received)
        return FetchFailed(f"{field}: {shown} sent nothing for {policy.read_timeout_s:g} s; try again later", code="fetch_timeout")
    if isinstance(exc, SSLError):
        return FetchFailed(f"{field}: TLS verification failed for {host}; the server needs a valid certificate")
    if isinstance(exc, (HTTPError, OSError, ValueError)):
        return FetchFailed(f"{field}: fetching {shown} failed ({type(exc).__name__})")
    return exc


def _open(
    parts: urllib.parse.SplitResult, ips: list[str], policy: FetchPolicy, field: str, clock: _Clock
) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    """Send GET to the first vetted IP that accepts a connection; returns (pool, unread response).

    Pinning: the pool's host is the checked IP (urllib3 connects to it as given, no DNS), while
    the Host header carries the original host and, for https, server_hostname (SNI) and
    assert_hostname (certificate check) are the original host name. Proxies are never used.
    """
    host, shown = parts.hostname or "", redact_url(urllib.parse.urlunsplit(parts))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Host": parts.netloc, "User-Agent": "medsam2-endpoint", "Accept-Encoding": "identity"}
    failure, code = "could not connect", "fetch_failed"
    for ip in ips:
        clock.check(field, shown, policy, 0)
        timeout = clock.timeout(policy)
        pool: urllib3.HTTPConnectionPool
        if parts.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                ip, port, timeout=timeout, retries=False, maxsize=1, cert_reqs="CERT_REQUIRED",
                ca_certs=_CA_CERTS or certifi.where(), server_hostname=host, assert_hostname=host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(ip, port, timeout=timeout, retries=False, maxsize=1)
        try:
            resp = pool.urlopen("GET", target, headers=headers, retries=False, redirect=False,
                                preload_content=False, assert_same_host=False)
            return pool, resp
        except NewConnectionError:  # refused/unreachable (a ConnectTimeoutError subclass): try the next IP
            failure, code = "could not connect", "fetch_failed"
        except ConnectTimeoutError:
            failure, code = f"connection timed out after {policy.connect_timeout_s:g} s", "fetch_timeout"
        except TimeoutError:  # azmlinfsrv's SIGALRM (urllib3 wraps socket time-outs in its own types)
            pool.close()
            raise
        except Exception as exc:
            pool.close()
            raise _upstream_error(exc, field, shown, host, policy, clock) from None
        pool.close()
    raise FetchFailed(f"{field}: {shown}: {failure} ({host} port {port}); try again later", code=code)


def _read_capped(resp: urllib3.BaseHTTPResponse, policy: FetchPolicy, field: str, shown: str, clock: _Clock,
                 check_head: Callable[[bytes], object] | None = None) -> bytes:
    """The body, refusing early on a Content-Length over the cap and stopping once the cap is exceeded;
    `check_head` sees the first HEAD_BYTES as soon as they arrived (the whole body when shorter)."""
    limit = f"the {policy.max_bytes} byte limit (MEDSAM2_FETCH_MAX_MB)"
    length = (resp.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise PayloadTooLarge(f"{field}: {shown} is {int(length)} bytes, over {limit}")
    chunks, total = [], 0
    try:  # read1 returns whatever has arrived, so the deadline holds even when a server drips bytes
        while chunk := _read1(resp, clock, policy):
            chunks.append(chunk)
            total += len(chunk)  # counted after decoding: a gzip bomb stops at the cap too
            if total > policy.max_bytes:
                raise PayloadTooLarge(f"{field}: {shown} is more than {policy.max_bytes} bytes, over {limit}")
            if check_head is not None and total >= HEAD_BYTES:
                check_head(b"".join(chunks)[:HEAD_BYTES])  # raises to refuse: the caller closes the connection
                check_head = None
            clock.check(field, shown, policy, total)
    except TimeoutError:  # azmlinfsrv's SIGALRM: its handler answers it, not a misleading 502
        raise
    except (HTTPError, OSError) as exc:
        raise _upstream_error(exc, field, shown, "", policy, clock, total) from None
    body = b"".join(chunks)
    if check_head is not None:
        check_head(body)
    return body


def _read1(resp: urllib3.BaseHTTPResponse, clock: _Clock, policy: FetchPolicy) -> bytes:
    """The next bytes, the socket's wait cut to what is left of the deadline (a stall cannot outlive the budget)."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(min(policy.read_timeout_s, max(0.05, clock.left())))
    return resp.read1(_CHUNK, decode_content=True)


def _too_slow(field: str, shown: str, policy: FetchPolicy) -> FetchRefused:
    return FetchFailed(f"{field}: fetching {shown} took longer than {policy.total_timeout_s:g} s", code="fetch_timeout")


def fetch_bytes(
    url: str, policy: FetchPolicy, *, field: str = "url", resolver: Resolver = default_resolver, budget: Budget | None = None,
    check_head: Callable[[bytes], object] | None = None,
) -> bytes:
    """GET url under policy and return the body. Each redirect hop is re-checked before connecting.

    The whole fetch ends by the policy's total time-out or, sooner, when the request's `budget` runs out.
    `check_head` (a file's header check) is called with the body's first HEAD_BYTES as soon as they have
    arrived (the whole body when shorter); an error it raises stops the download and closes the connection.
    Raises FetchRefused (refused before sending), FetchFailed (upstream failure; code fetch_timeout when too slow),
    DeadlineExceeded (the budget ran out, or it was cancelled) or PayloadTooLarge (413).
    """
    started = time.monotonic()
    clock, current = _Clock.start(policy, budget), str(url)
    for hop in range(policy.max_redirects + 1):
        label = "URL" if hop == 0 else "redirect target"
        parts, ips = check_url(current, policy, resolver=resolver, field=field, label=label)
        shown = redact_url(current)
        clock.check(field, shown, policy, 0)
        pool, resp = _open(parts, ips, policy, field, clock)
        try:
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchFailed(f"{field}: {shown} redirected without a Location header")
                current = urllib.parse.urljoin(urllib.parse.urlunsplit(parts), location.strip())
                log.debug("fetch %s: redirect %d to %s", shown, hop + 1, redact_url(current))
                continue
            if not 200 <= resp.status < 300:
                raise FetchFailed(
                    f"{field}: fetching {shown} failed: the server answered HTTP {resp.status}; "
                    "check that the file exists and that the URL's SAS token is valid and not expired")
            body = _read_capped(resp, policy, field, shown, clock, check_head)
            log.debug("fetched %s: %d bytes after %d redirect(s) in %.2f s", shown, len(body), hop,
                      time.monotonic() - started)
            return body
        finally:
            resp.close()
            pool.close()
    raise FetchRefused(f"{field}: too many redirects (more than {policy.max_redirects}); give the final URL directly")

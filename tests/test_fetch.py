"""Tests for the SSRF-safe fetcher.

Network traffic goes only to servers these tests start on loopback; an autouse guard fails
any test that tries a DNS lookup (non-numeric name) or a connection to a non-loopback address.
Outside names are resolved by injected fake resolvers.
"""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3.util.connection
from hypothesis import given, settings
from hypothesis import strategies as st

from medsam2_endpoint.api.errors import http_status
from medsam2_endpoint.base.budget import Budget, Cancelled
from medsam2_endpoint.base.errors import DeadlineExceeded, FetchRefused, PayloadTooLarge
from medsam2_endpoint.core.settings import Settings, SettingsError
from medsam2_endpoint.io import fetch
from medsam2_endpoint.io.fetch import FetchPolicy, check_url, classify_address, fetch_bytes, redact_url

LOOP = FetchPolicy(allow_http=True, allow_networks=("127.0.0.0/8", "::1/128"), max_bytes=1000)
BODY = b"hello volume"


# --------------------------------------------------------------------------- guards and helpers


@pytest.fixture(autouse=True)
def connects(monkeypatch):
    """Record every outgoing connection; fail on DNS lookups and on non-loopback destinations."""
    seen: list[tuple] = []
    real_gai, real_cc = socket.getaddrinfo, urllib3.util.connection.create_connection

    def guarded_gai(host, port, *args, **kwargs):
        try:
            real_gai(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        except socket.gaierror:
            pytest.fail(f"test attempted a DNS lookup of {host!r}")
        return real_gai(host, port, *args, **kwargs)

    def spy(address, *args, **kwargs):
        seen.append(address)
        if not ipaddress.ip_address(address[0].strip("[]")).is_loopback:
            pytest.fail(f"test attempted a connection to {address}")
        return real_cc(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_gai)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    return seen


class FakeResolver:
    """resolver(host, port) from a dict; records calls; unknown names fail the test."""

    def __init__(self, table: dict[str, list[str]]):
        self.table, self.calls = table, []

    def __call__(self, host, port):
        self.calls.append((host, port))
        if host not in self.table:
            pytest.fail(f"unexpected resolution of {host!r}")
        return self.table[host]


def refuse_all(host, port):
    pytest.fail(f"resolver must not be called (asked for {host!r})")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body=b"", headers=(), length=True):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        self.server.seen.append((self.path, self.headers.get("Host")))
        try:
            self.route(parts.path, query)
        except OSError:  # the client gave up (time-out tests)
            pass

    def route(self, path, query):
        if path == "/ok":
            self.send(200, BODY)
        elif path == "/host":
            self.send(200, self.headers.get("Host", "").encode())
        elif path == "/redirect":
            self.send(int(query.get("code", ["302"])[0]), headers=[("Location", query["to"][0])])
        elif path.startswith("/hop/"):
            n = int(path.rsplit("/", 1)[1])
            self.send(302, headers=[("Location", f"/hop/{n - 1}" if n > 1 else "/ok")])
        elif path == "/loop":
            self.send(302, headers=[("Location", "/loop")])
        elif path == "/nolocation":
            self.send(302)
        elif path == "/missing":
            self.send(404, b"not here")
        elif path == "/big-length":
            self.send(200, b"x" * 10, headers=[("Content-Length", "10000000")], length=False)
        elif path == "/short-body":  # says 500 bytes, sends 10
            self.send(200, b"x" * 10, headers=[("Content-Length", "500")], length=False)
        elif path == "/no-length":  # HTTP/1.0, body until close
            self.send(200, b"x" * 5000, length=False)
        elif path == "/chunked":
            self.protocol_version = "HTTP/1.1"
            self.send(200, headers=[("Transfer-Encoding", "chunked"), ("Connection", "close")], length=False)
            for _ in range(10):
                self.wfile.write(b"200\r\n" + b"y" * 0x200 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/gzip":  # 5000 bytes that arrive as about 40
            self.send(200, gzip.compress(b"g" * 5000), headers=[("Content-Encoding", "gzip")])
        elif path == "/slow":
            time.sleep(1.0)
            self.send(200, BODY)
        elif path == "/stall":  # headers and one byte, then nothing for longer than any budget in these tests
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"z")
            self.wfile.flush()
            time.sleep(5.0)
        elif path == "/drip":
            self.send_response(200)
            self.end_headers()
            for _ in range(15):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send(500)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self):  # skip HTTPServer's getfqdn (a reverse DNS lookup)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


def start(address=("127.0.0.1", 0), family=socket.AF_INET, tls=None):
    cls = type("S", (Server,), {"address_family": family})
    srv = cls(address, Handler)
    srv.seen, srv.sni = [], []
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: srv.sni.append(name)
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def stop(srv):
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server():
    srv = start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    stop(srv)


@pytest.fixture(autouse=True)
def _clear(request):
    if "server" in request.fixturenames:
        request.getfixturevalue("server").seen.clear()


# --------------------------------------------------------------------------- address classification


@pytest.mark.parametrize(
    "ip, reason",
    [
        ("10.0.0.5", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"), ("169.254.169.254", "cloud metadata"), ("169.254.1.1", "link-local"),
        ("168.63.129.16", "cloud metadata"), ("100.100.100.200", "shared"), ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("0.0.0.0", "unspecified"),
        ("::1", "loopback"), ("::", "unspecified"), ("fd00::1", "private"), ("fc00::1", "private"),
        ("fd00:ec2::254", "cloud metadata"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
        ("ff02::1", "multicast"), ("fec0::1", "site-local"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"), ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"), ("::10.0.0.1", "IPv4-compatible private"),
        ("::8.8.8.8", "IPv4-compatible"), ("2002:a00:1::", "6to4-embedded private"),
        ("2002:808:808::1", "6to4"), ("64:ff9b::a00:1", "NAT64-embedded private"),
        ("64:ff9b::7f00:1", "NAT64-embedded loopback"), ("2001::1", "Teredo"), ("not-an-ip", "not an IP"),
    ],
)
def test_classify_refuses(ip, reason):
    got = classify_address(ip)
    assert got is not None and reason in got


@pytest.mark.parametrize("ip", ["8.8.8.8", "20.60.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_classify_public(ip):
    assert classify_address(ip) is None


EXTRA_REFUSALS = ("6to4", "Teredo", "IPv4-compatible", "cloud metadata", "site-local")  # stricter than ipaddress


@settings(max_examples=400, deadline=None)
@given(st.ip_addresses())
def test_classify_matches_ipaddress(addr):
    """Refused exactly when ipaddress calls the (effective) address non-public, plus a few extra refusals."""
    eff = addr
    if addr.version == 6 and addr.ipv4_mapped is not None:
        eff = addr.ipv4_mapped
    elif addr in ipaddress.ip_network("64:ff9b::/96"):
        eff = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    non_public = not eff.is_global or any(
        getattr(eff, p) for p in ("is_multicast", "is_loopback", "is_link_local", "is_private", "is_reserved",
                                  "is_unspecified")
    )
    reason = classify_address(str(addr))
    if non_public:
        assert reason is not None
    elif reason is not None:
        assert any(t in reason for t in EXTRA_REFUSALS), (addr, reason)


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=4))
def test_mapped_form_agrees_with_ipv4(v4):
    assert (classify_address(f"::ffff:{v4}") is None) == (classify_address(str(v4)) is None)


# --------------------------------------------------------------------------- check_url (no connections)


PRIVATE = ["10.0.0.5", "169.254.169.254", "127.0.0.1", "224.0.0.1", "240.0.0.1", "0.0.0.0", "::1", "fd12::1",
           "fe80::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "2002:a00:1::"]


@pytest.mark.parametrize("ip", PRIVATE)
def test_check_url_refuses_resolved_private(ip, connects):
    resolver = FakeResolver({"files.example.test": ["93.184.216.34", ip]})  # any bad address refuses
    with pytest.raises(FetchRefused) as err:
        check_url("https://files.example.test/a.nii.gz?sig=SECRET", FetchPolicy(), resolver=resolver,
                  field="input_data.nii_image[0]")
    msg = str(err.value)
    assert http_status(err.value) == 400 and msg.startswith("input_data.nii_image[0]: ")
    assert f"({ip} is " in msg and "only public https URLs are accepted" in msg and "SECRET" not in msg
    assert connects == []


@pytest.mark.parametrize(
    "url", ["https://10.0.0.1/x", "https://169.254.169.254/latest/meta-data", "https://[::1]/x",
            "https://[::ffff:127.0.0.1]/x", "https://[fe80::1%25eth0]/x", "https://0.0.0.0/x"],
)
def test_check_url_refuses_ip_literals_without_resolving(url, connects):
    with pytest.raises(FetchRefused, match="host is a non-public address"):
        check_url(url, FetchPolicy(), resolver=refuse_all)
    assert connects == []


@pytest.mark.parametrize("url", ["https://2130706433/x", "https://0x7f.1/x", "https://127.1/x"])
def test_numeric_host_spellings_resolve_to_loopback(url):
    with pytest.raises(FetchRefused, match="loopback"):
        check_url(url, FetchPolicy())  # default resolver: numeric names need no DNS


def test_check_url_accepts_public_and_normalises():
    resolver = FakeResolver({"acct.blob.core.windows.net": ["20.60.0.1", "20.60.0.1"]})
    parts, ips = check_url("HTTPS://Acct.Blob.Core.Windows.Net./c/a b.nii.gz?sv=1&sig=x#frag", FetchPolicy(),
                           resolver=resolver)
    assert ips == ["20.60.0.1"] and resolver.calls == [("acct.blob.core.windows.net", 443)]
    assert (parts.scheme, parts.netloc, parts.path, parts.query, parts.fragment) == (
        "https", "acct.blob.core.windows.net", "/c/a%20b.nii.gz", "sv=1&sig=x", "")


def test_https_required_by_default():
    resolver = FakeResolver({"files.example.test": ["93.184.216.34"]})
    with pytest.raises(FetchRefused, match=r"only https URLs are accepted \(got http\)") as err:
        check_url("http://files.example.test/a?sig=SECRET", FetchPolicy(), resolver=resolver)
    assert "SECRET" not in str(err.value) and resolver.calls == []
    for url in ["ftp://files.example.test/a", "file:///etc/passwd", "files.example.test/a", "gopher://x/"]:
        with pytest.raises(FetchRefused, match="only https URLs"):
            check_url(url, FetchPolicy(), resolver=resolver)
    check_url("http://files.example.test/a", FetchPolicy(allow_http=True), resolver=resolver)


@pytest.mark.parametrize("url", ["https://user:SECRET@files.example.test/a", "https://SECRET@files.example.test/"])
def test_userinfo_refused(url):
    with pytest.raises(FetchRefused, match="credentials") as err:
        check_url(url, FetchPolicy(), resolver=refuse_all)
    assert "SECRET" not in str(err.value)


def test_host_allowlist():
    policy = FetchPolicy(host_allowlist=("*.blob.core.windows.net",))
    resolver = FakeResolver({h: ["20.60.0.1"] for h in ["acct.blob.core.windows.net", "a.b.blob.core.windows.net"]})
    check_url("https://acct.blob.core.windows.net/c/f.nii.gz?sig=x", policy, resolver=resolver)
    check_url("https://a.b.blob.core.windows.net/f", policy, resolver=resolver)
    for host in ["blob.core.windows.net.evil.test", "evilblob.core.windows.net", "blob.core.windows.net"]:
        with pytest.raises(FetchRefused, match=r"is not allowed; allowed hosts: \*\.blob\.core\.windows\.net"):
            check_url(f"https://{host}/f?sig=SECRET", policy, resolver=refuse_all)


@pytest.mark.parametrize("url", ["https:///path", "https://[::1/x", "https://h:99999/x", "https://bad host/x",
                                 "https://a..b/x", ""])
def test_malformed_urls_refused(url):
    with pytest.raises(FetchRefused):
        check_url(url, FetchPolicy(), resolver=refuse_all)


def test_unresolvable_host():
    def failing(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for resolver in (FakeResolver({"nowhere.test": []}), failing):
        with pytest.raises(FetchRefused, match="host nowhere.test could not be resolved"):
            check_url("https://nowhere.test/x", FetchPolicy(), resolver=resolver)
    with pytest.raises(FetchRefused, match="not an IP address"):
        check_url("https://nowhere.test/x", FetchPolicy(), resolver=FakeResolver({"nowhere.test": ["bogus"]}))


def test_redact_url():
    assert redact_url("https://u:pw@acct.blob.core.windows.net:443/c/f.nii.gz?sv=1&sig=SECRET#x") == (
        "https://acct.blob.core.windows.net:443/c/f.nii.gz")
    assert redact_url("https://h/p;x?sig=SECRET") == "https://h/p;x"
    assert redact_url("http://[::1]:8080/a") == "http://[::1]:8080/a"
    assert redact_url("https://[bad?sig=SECRET") == "<unparseable URL>"
    assert len(redact_url("A" * 10_000)) < 300  # a base64 blob given by mistake is not echoed whole


def test_policy_from_settings():
    p = Settings.from_env({
        "MEDSAM2_FETCH_ALLOW_HTTP": "true", "MEDSAM2_FETCH_HOST_ALLOWLIST": "*.blob.core.windows.net, X.test",
        "MEDSAM2_FETCH_ALLOW_NETWORKS": "127.0.0.0/8,::1", "MEDSAM2_FETCH_MAX_MB": "2",
        "MEDSAM2_FETCH_CONNECT_TIMEOUT_S": "1.5", "MEDSAM2_FETCH_READ_TIMEOUT_S": "7",
    }).fetch
    assert p == FetchPolicy(True, ("*.blob.core.windows.net", "x.test"), ("127.0.0.0/8", "::1"), 2 << 20, 1.5, 7.0)
    assert Settings.from_env({}).fetch == FetchPolicy()
    for bad in [{"MEDSAM2_FETCH_MAX_MB": "lots"}, {"MEDSAM2_FETCH_READ_TIMEOUT_S": "0"},
                {"MEDSAM2_FETCH_ALLOW_NETWORKS": "10.0.0.0/33"}]:
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_env(bad)


# --------------------------------------------------------------------------- fetching from loopback


def test_fetch_ok(server, connects):
    assert fetch_bytes(server.base + "/ok?sig=x", LOOP) == BODY
    assert connects == [("127.0.0.1", server.server_address[1])]
    assert server.seen == [("/ok?sig=x", f"127.0.0.1:{server.server_address[1]}")]


def test_connects_to_vetted_ip_with_original_host_header(server, connects):
    port = server.server_address[1]
    resolver = FakeResolver({"good.test": ["127.0.0.1"]})
    assert fetch_bytes(f"http://good.test:{port}/host", LOOP, resolver=resolver) == f"good.test:{port}".encode()
    assert resolver.calls == [("good.test", port)] and connects == [("127.0.0.1", port)]


def test_falls_back_to_next_vetted_address(server, connects):
    port = server.server_address[1]
    resolver = FakeResolver({"good.test": ["127.0.0.2", "127.0.0.1"]})  # nothing listens on .2
    assert fetch_bytes(f"http://good.test:{port}/ok", LOOP, resolver=resolver) == BODY
    assert connects == [("127.0.0.2", port), ("127.0.0.1", port)]


def test_connection_refused_is_502():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchRefused, match="could not connect") as err:
        fetch_bytes(f"http://127.0.0.1:{port}/x?sig=SECRET", LOOP)
    assert http_status(err.value) == 502 and "SECRET" not in str(err.value)


def test_size_cap_by_content_length(server):
    with pytest.raises(PayloadTooLarge, match="10000000 bytes") as err:
        fetch_bytes(server.base + "/big-length", LOOP)
    assert http_status(err.value) == 413


@pytest.mark.parametrize("path", ["/no-length", "/chunked"])
def test_size_cap_while_streaming(server, path):
    with pytest.raises(PayloadTooLarge, match="more than 1000 bytes"):
        fetch_bytes(server.base + path, LOOP)
    roomy = FetchPolicy(allow_http=True, allow_networks=("127.0.0.0/8",))
    assert len(fetch_bytes(server.base + path, roomy)) == (5000 if path == "/no-length" else 5120)


def test_size_cap_counts_decoded_bytes(server):
    with pytest.raises(PayloadTooLarge):  # a small compressed body that inflates past the cap
        fetch_bytes(server.base + "/gzip", LOOP)
    roomy = FetchPolicy(allow_http=True, allow_networks=("127.0.0.0/8",))
    assert fetch_bytes(server.base + "/gzip", roomy) == b"g" * 5000


def test_short_body_is_502(server):
    with pytest.raises(FetchRefused) as err:
        fetch_bytes(server.base + "/short-body", LOOP)
    assert http_status(err.value) == 502


def test_redirect_chain_is_followed_and_rechecked(server):
    port = server.server_address[1]
    resolver = FakeResolver({"good.test": ["127.0.0.1"]})
    to = urllib.parse.quote(f"http://good.test:{port}/hop/2", safe="")
    assert fetch_bytes(f"{server.base}/redirect?code=307&to={to}", LOOP, resolver=resolver) == BODY
    assert [p for p, _ in server.seen] == [f"/redirect?code=307&to={to}", "/hop/2", "/hop/1", "/ok"]
    assert resolver.calls == [("good.test", port)] * 3  # every hop on that host re-resolved and re-checked


@pytest.mark.parametrize("target", ["http://10.0.0.1/x?sig=SECRET", "http://169.254.169.254/latest/meta-data/",
                                    "http://[::ffff:10.0.0.1]/", "http://evil.test/x?sig=SECRET"])
def test_redirect_to_refused_address_never_connects(server, connects, target):
    resolver = FakeResolver({"evil.test": ["10.0.0.1"]})
    url = f"{server.base}/redirect?to={urllib.parse.quote(target, safe='')}&sig=SECRET"
    with pytest.raises(FetchRefused, match="redirect target host (is|resolves to) a non-public address") as err:
        fetch_bytes(url, LOOP, resolver=resolver)
    assert http_status(err.value) == 400 and "SECRET" not in str(err.value)
    assert connects == [("127.0.0.1", server.server_address[1])]  # only the first hop connected
    assert resolver.calls == ([("evil.test", 80)] if "evil" in target else [])


def test_redirect_scheme_rechecked(server):
    to = urllib.parse.quote("ftp://127.0.0.1/x", safe="")
    with pytest.raises(FetchRefused, match=r"redirect target refused: only https or http URLs are accepted"):
        fetch_bytes(f"{server.base}/redirect?to={to}", LOOP)


def test_three_redirects_allowed_four_refused(server):
    assert fetch_bytes(server.base + "/hop/3", LOOP) == BODY
    server.seen.clear()
    with pytest.raises(FetchRefused, match=r"too many redirects \(more than 3\)"):
        fetch_bytes(server.base + "/hop/4", LOOP)
    with pytest.raises(FetchRefused, match="too many redirects"):
        fetch_bytes(server.base + "/loop", LOOP)
    assert len(server.seen) == 4 + 4  # /hop/4 ... /hop/1 (its redirect refused), then /loop 4 times


def test_redirect_without_location_is_502(server):
    with pytest.raises(FetchRefused, match="without a Location") as err:
        fetch_bytes(server.base + "/nolocation", LOOP)
    assert http_status(err.value) == 502


def test_http_error_is_502_without_query(server):
    with pytest.raises(FetchRefused, match="HTTP 404") as err:
        fetch_bytes(server.base + "/missing?sv=2024&sig=SECRET", LOOP, field="input_data.nii_image[0]")
    assert http_status(err.value) == 502 and "SECRET" not in str(err.value)
    assert str(err.value).startswith(f"input_data.nii_image[0]: fetching {server.base}/missing failed")


def test_read_timeout_is_504(server):
    policy = FetchPolicy(allow_http=True, allow_networks=("127.0.0.0/8",), read_timeout_s=0.3)
    with pytest.raises(FetchRefused, match="sent nothing for 0.3 s") as err:
        fetch_bytes(server.base + "/slow?sig=SECRET", policy)
    assert http_status(err.value) == 504 and "SECRET" not in str(err.value)


def test_total_timeout_is_504(server):
    policy = FetchPolicy(allow_http=True, allow_networks=("127.0.0.0/8",), total_timeout_s=0.3)
    with pytest.raises(FetchRefused, match="took longer than 0.3 s") as err:
        fetch_bytes(server.base + "/drip", policy)
    assert http_status(err.value) == 504


@pytest.mark.parametrize("path", ["/drip", "/stall"])
def test_a_budget_shorter_than_the_fetch_time_outs_ends_the_fetch_as_a_deadline(server, path):
    """What is left of the request's budget bounds the fetch (reads and the socket's wait), and running out
    is the request's deadline (503 `deadline`), not a fetch failure (502/504)."""
    with pytest.raises(DeadlineExceeded) as err:
        fetch_bytes(server.base + path + "?sig=SECRET", LOOP, field="nii_image", budget=Budget(0.4))
    assert err.value.code == "deadline" and http_status(err.value) == 503
    assert "ran out while fetching" in err.value.message and "SECRET" not in err.value.message
    assert err.value.detail["bytes_fetched"] >= 1


def test_the_fetch_time_out_still_applies_when_the_budget_is_longer(server):
    policy = FetchPolicy(allow_http=True, allow_networks=("127.0.0.0/8",), total_timeout_s=0.3)
    with pytest.raises(FetchRefused, match="took longer than 0.3 s") as err:
        fetch_bytes(server.base + "/drip", policy, budget=Budget(60))
    assert http_status(err.value) == 504


def test_a_cancelled_budget_stops_the_fetch(server):
    budget = Budget(60)
    budget.cancel()
    with pytest.raises(Cancelled):
        fetch_bytes(server.base + "/ok", LOOP, budget=budget)


def test_the_scoring_alarm_passes_through_the_fetch(server, monkeypatch):
    """azmlinfsrv's SIGALRM raises TimeoutError (an OSError) wherever the worker is: the fetch must not turn
    it into a misleading 502; the adapter answers it (503 `deadline`)."""

    def alarm(*args, **kwargs):
        raise TimeoutError

    monkeypatch.setattr(fetch, "_read1", alarm)
    with pytest.raises(TimeoutError):
        fetch_bytes(server.base + "/ok", LOOP)


def test_private_refused_without_allow_networks(server, connects):
    with pytest.raises(FetchRefused, match=r"127\.0\.0\.1 is loopback"):
        fetch_bytes(server.base + "/ok", FetchPolicy(allow_http=True))
    assert connects == []


def test_ipv6_loopback_fetch():
    try:
        srv = start(("::1", 0), socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert fetch_bytes(f"http://[::1]:{srv.server_address[1]}/ok", LOOP) == BODY
    finally:
        stop(srv)


# --------------------------------------------------------------------------- TLS: pinned IP, original name


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.1 whose certificate (from a test CA) names only medsam.test."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("medsam.test")]), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("fetch test CA"), ca_key, name("fetch test CA"), ca_key, True)
    leaf = cert(name("medsam.test"), key, name("fetch test CA"), ca_key, False)
    d = tmp_path_factory.mktemp("tls")
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "leaf.pem", d / "key.pem")
    srv = start(tls=ctx)
    srv.ca, srv.port = str(d / "ca.pem"), srv.server_address[1]
    yield srv
    stop(srv)


TLS_POLICY = FetchPolicy(allow_networks=("127.0.0.0/8",))


def test_tls_uses_original_name_for_sni_and_verification(tls_server, monkeypatch, connects):
    monkeypatch.setattr(fetch, "_CA_CERTS", tls_server.ca)
    tls_server.sni.clear()
    resolver = FakeResolver({"medsam.test": ["127.0.0.1"]})
    body = fetch_bytes(f"https://medsam.test:{tls_server.port}/host?sig=x", TLS_POLICY, resolver=resolver)
    assert body == f"medsam.test:{tls_server.port}".encode()
    assert tls_server.sni == ["medsam.test"] and connects == [("127.0.0.1", tls_server.port)]


def test_tls_certificate_must_match_original_name(tls_server, monkeypatch):
    monkeypatch.setattr(fetch, "_CA_CERTS", tls_server.ca)
    resolver = FakeResolver({"other.test": ["127.0.0.1"]})
    with pytest.raises(FetchRefused, match="TLS verification failed for other.test") as err:
        fetch_bytes(f"https://other.test:{tls_server.port}/ok?sig=SECRET", TLS_POLICY, resolver=resolver)
    assert http_status(err.value) == 502 and "SECRET" not in str(err.value)


def test_tls_untrusted_certificate_refused(tls_server):
    resolver = FakeResolver({"medsam.test": ["127.0.0.1"]})  # default CA bundle does not trust the test CA
    with pytest.raises(FetchRefused, match="TLS verification failed"):
        fetch_bytes(f"https://medsam.test:{tls_server.port}/ok", TLS_POLICY, resolver=resolver)


def test_https_to_http_redirect_refused(tls_server, monkeypatch, server):
    monkeypatch.setattr(fetch, "_CA_CERTS", tls_server.ca)
    resolver = FakeResolver({"medsam.test": ["127.0.0.1"]})
    to = urllib.parse.quote(server.base + "/ok", safe="")
    with pytest.raises(FetchRefused, match=r"redirect target refused: only https URLs are accepted \(got http\)"):
        fetch_bytes(f"https://medsam.test:{tls_server.port}/redirect?to={to}", TLS_POLICY, resolver=resolver)
    assert server.seen == []

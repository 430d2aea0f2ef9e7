"""The lab's caching archive relay (homeclust/lab/aptcache.py).

Pure parts first; then the relay itself, served on a Unix socket in a temp
directory against a stand-in for Debian's archive on 127.0.0.1 -- no root, no
lab, nothing leaves loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from homeclust.lab.aptcache import (
    TRAILER_MAGIC,
    AptCacheStats,
    EntryMeta,
    Kind,
    RelayServer,
    cache_file,
    canonical_path,
    classify,
    client_has_current,
    conditional_headers,
    decode_trailer,
    encode_trailer,
    is_fresh,
    serving,
    summarize,
    upstream_length,
    upstream_target,
    wants_refresh,
)
from homeclust.lab.uplink import Uplink

DEB = "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
INRELEASE = "/debian/dists/bookworm/InRelease"

# ----------------------------------------------------------------- pure parts


@pytest.mark.parametrize("target, expected", [
    (DEB, DEB),
    ("/debian/pool/main/libs/libstdc%2b%2b6_12.2.0_amd64.deb",
     "/debian/pool/main/libs/libstdc++6_12.2.0_amd64.deb"),
    ("/debian-security/dists/bookworm-security/InRelease",
     "/debian-security/dists/bookworm-security/InRelease"),
    (f"http://deb.debian.org{INRELEASE}", INRELEASE),
    (f"http://deb.debian.org:80{INRELEASE}", INRELEASE),
    ("/etc/passwd", None),
    ("/debian/../etc/passwd", None),
    ("/debian/%2e%2e/%2e%2e/etc/passwd", None),
    ("/debian/dists/./bookworm/InRelease", None),
    ("/debian//dists", None),
    ("/debian/", None),
    ("/debianx/dists/bookworm/InRelease", None),
    ("/debian/dists/bookworm/InRelease?x=1", None),
    ("/debian/dists/a%00b", None),
    ("/debian/dists/a%ffb", None),  # not UTF-8
    ("/debian/dists/.hidden", None),
    (f"http://evil.example{INRELEASE}", None),
    (f"http://deb.debian.org.evil.example{INRELEASE}", None),
    ("deb.debian.org:443", None),  # CONNECT-style target
    ("*", None),
])
def test_canonical_path_allows_only_the_two_archives(target: str, expected: str | None) -> None:
    assert canonical_path(target) == expected


def test_cache_paths_stay_inside_the_cache(tmp_path: Path) -> None:
    path = canonical_path("/debian/pool/main/libs/libstdc%2b%2b6_1_amd64.deb")
    assert path is not None
    assert cache_file(tmp_path, path) == tmp_path / "debian/pool/main/libs/libstdc++6_1_amd64.deb"
    assert upstream_target(path) == "/debian/pool/main/libs/libstdc++6_1_amd64.deb"
    assert upstream_target("/debian/pool/a b") == "/debian/pool/a%20b"


@pytest.mark.parametrize("path, kind", [
    (DEB, Kind.IMMUTABLE),
    ("/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/abc", Kind.IMMUTABLE),
    ("/debian/pool/main/h/hello/hello_2.10-3.dsc", Kind.IMMUTABLE),
    (INRELEASE, Kind.INDEX),
    ("/debian/dists/bookworm/Release.gpg", Kind.INDEX),
    ("/debian/dists/bookworm/main/binary-amd64/Packages.xz", Kind.INDEX),
    ("/debian/dists/bookworm/main/i18n/Translation-en.bz2", Kind.INDEX),
    ("/debian/dists/bookworm/main/Contents-amd64.gz", Kind.INDEX),
    ("/debian/dists/bookworm/main/source/Sources.xz", Kind.INDEX),
])
def test_classify(path: str, kind: Kind) -> None:
    assert classify(path) is kind


def test_freshness() -> None:
    assert is_fresh(Kind.IMMUTABLE, 0, 10**9, 600)
    assert is_fresh(Kind.INDEX, 1000, 1599, 600)
    assert not is_fresh(Kind.INDEX, 1000, 1600, 600)
    assert not is_fresh(Kind.INDEX, 1000, 900, 600)  # the clock went back: ask again


def test_trailer_round_trip_and_damage() -> None:
    meta = EntryMeta(INRELEASE, 5, "text/plain", "Sat, 10 Aug 2024 09:00:00 GMT", '"abc"')
    trailer = encode_trailer(meta)
    assert trailer.endswith(TRAILER_MAGIC)
    whole = b"hello" + trailer
    assert decode_trailer(whole, len(whole)) == meta
    assert decode_trailer(whole[:-1], len(whole) - 1) is None  # torn
    assert decode_trailer(whole, len(whole) + 1) is None  # body length does not add up
    assert decode_trailer(b"just a file", 11) is None


def test_conditional_headers_and_client_revalidation() -> None:
    meta = EntryMeta(INRELEASE, 1, last_modified="Sat, 10 Aug 2024 09:00:00 GMT", etag='"v1"')
    assert conditional_headers(meta) == {"If-None-Match": '"v1"',
                                         "If-Modified-Since": "Sat, 10 Aug 2024 09:00:00 GMT"}
    assert conditional_headers(EntryMeta(INRELEASE, 1)) == {}
    assert client_has_current(meta, '"v0", "v1"', None)
    assert client_has_current(meta, 'W/"v1"', None)
    assert client_has_current(meta, "*", None)
    # If-None-Match decides alone when present (RFC 9110 13.2.2).
    assert not client_has_current(meta, '"v2"', "Sun, 11 Aug 2024 09:00:00 GMT")
    assert client_has_current(meta, None, "Sat, 10 Aug 2024 09:00:00 GMT")
    assert client_has_current(meta, None, "Sun, 11 Aug 2024 09:00:00 GMT")
    assert not client_has_current(meta, None, "Fri, 09 Aug 2024 09:00:00 GMT")
    assert not client_has_current(meta, None, "garbage")
    assert not client_has_current(EntryMeta(INRELEASE, 1), None, "Sun, 11 Aug 2024 09:00:00 GMT")


def test_upstream_length() -> None:
    assert upstream_length([("Content-Length", "42")]) == 42
    assert upstream_length([("Transfer-Encoding", "chunked"), ("Content-Length", "42")]) is None
    assert upstream_length([]) is None
    assert upstream_length([("content-length", "x")]) is None


def test_summarize_and_subtract() -> None:
    lines = [
        json.dumps({"cache": "miss", "upstream_requests": 1, "upstream_bytes": 100,
                    "client_bytes": 100}),
        json.dumps({"cache": "hit", "upstream_requests": 0, "upstream_bytes": 0,
                    "client_bytes": 100}),
        json.dumps({"cache": "refused", "client_bytes": 10}),
        "not json",
        '{"cache": "hit", "upstream_by',  # a torn last line
    ]
    stats = summarize(lines)
    assert stats == AptCacheStats(requests=3, hits=1, misses=1, refused=1, upstream_requests=1,
                                  upstream_bytes=100, client_bytes=210)
    assert stats.from_cache == 1
    assert (stats - summarize(lines[:1])) == AptCacheStats(
        requests=2, hits=1, refused=1, client_bytes=110)
    assert "100 requests" not in stats.describe() and "3 requests" in stats.describe()


# ------------------------------------------------------- a stand-in archive


@dataclass
class FakeArchive:
    """What the stand-in archive serves, and what it was asked."""

    files: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)  # path -> size, made up on the fly
    mode: str = "ok"  # ok | 500 | cut | chunked | hang
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, path: str, body: bytes, **headers: str) -> None:
        self.files[path] = (body, {k.replace("_", "-"): v for k, v in headers.items()})

    def asked(self, path: str | None = None) -> int:
        return sum(1 for _, p, _ in self.requests if path is None or p == path)


def _archive_handler(archive: FakeArchive) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            with archive.lock:
                archive.requests.append((self.command, self.path, dict(self.headers)))
            if archive.mode == "hang":
                time.sleep(3)
            if archive.mode == "500":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path in archive.generated:
                size = archive.generated[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                piece = b"\x5a" * 65536
                for start in range(0, size, len(piece)):
                    self.wfile.write(piece[: size - start])
                return
            found = archive.files.get(self.path)
            if found is None:
                body = b"not here\n"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            body, headers = found
            etag = headers.get("ETag")
            if etag and self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            if archive.mode == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(body), 1000):
                    piece = body[start:start + 1000]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if archive.mode == "cut":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the relay hung up on a hanging or cut-off answer: expected here


@pytest.fixture
def archive() -> Iterator[tuple[FakeArchive, tuple[str, int]]]:
    world = FakeArchive()
    server = _QuietServer(("127.0.0.1", 0), _archive_handler(world))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield world, ("127.0.0.1", server.server_address[1])
    server.shutdown()
    server.server_close()


@dataclass
class Relay:
    server: RelayServer
    socket: Path
    cache: Path
    stats_file: Path
    uplink_file: Path

    def stats(self, requests: int) -> AptCacheStats:
        """The counters once ``requests`` requests are logged (a request's line is
        written just after its answer, so the client can be a moment ahead)."""
        deadline = time.monotonic() + 5
        while True:
            stats = summarize(self.stats_file.read_text().splitlines())
            if stats.requests >= requests or time.monotonic() > deadline:
                return stats
            time.sleep(0.01)

    def connect(self) -> http.client.HTTPConnection:
        return UnixHTTPConnection(str(self.socket))

    def get(self, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = self.connect()
        try:
            conn.request(method, path, headers={"Host": "deb.debian.org", **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("deb.debian.org", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@pytest.fixture
def relay_factory(
    tmp_path: Path, archive: tuple[FakeArchive, tuple[str, int]]
) -> Iterator[Any]:
    stack: list[Any] = []

    def make(ttl: float = 600.0, upstream_timeout: float = 5.0,
             upstream: tuple[str, int] | None = None) -> Relay:
        n = len(stack)
        paths = (tmp_path / f"relay{n}.sock", tmp_path / "cache", tmp_path / f"stats{n}.jsonl",
                 tmp_path / f"uplink{n}.json")
        context = serving(paths[0], paths[1], paths[2], paths[3], upstream or archive[1], ttl,
                          upstream_timeout)
        server = context.__enter__()
        stack.append(context)
        return Relay(server, *paths)

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def relay(relay_factory: Any) -> Relay:
    made: Relay = relay_factory()
    return made


# ------------------------------------------------------------- the relay


def test_a_second_fetch_comes_from_the_cache(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    body = os.urandom(300_000)
    world.put(DEB, body, Content_Type="application/vnd.debian.binary-package")
    first = relay.get(DEB)
    second = relay.get(DEB)
    assert first[0] == second[0] == 200
    assert first[2] == second[2] == body
    assert first[1]["X-Cache"] == "MISS" and second[1]["X-Cache"] == "HIT"
    assert second[1]["Content-Type"] == "application/vnd.debian.binary-package"
    assert world.asked(DEB) == 1
    stats = relay.stats(2)
    assert (stats.misses, stats.hits, stats.upstream_bytes, stats.client_bytes) == (
        1, 1, len(body), 2 * len(body))
    stored = relay.cache / DEB.lstrip("/")
    assert stored.read_bytes().startswith(body)
    assert list((relay.cache / ".tmp").iterdir()) == []  # nothing half-written left


def test_upstream_sees_the_archive_host_and_an_encoded_path(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put("/debian/pool/main/libstdc++6_1_amd64.deb", b"x")
    assert relay.get("/debian/pool/main/libstdc%2b%2b6_1_amd64.deb")[2] == b"x"
    assert relay.get("/debian/pool/main/libstdc++6_1_amd64.deb")[1]["X-Cache"] == "HIT"
    method, path, headers = world.requests[0]
    assert (method, path, headers["Host"]) == ("GET", "/debian/pool/main/libstdc++6_1_amd64.deb",
                                               "deb.debian.org")


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    paths = [f"/debian/pool/main/p/p{i}.deb" for i in range(6)]
    for i, path in enumerate(paths):
        world.put(path, bytes([65 + i]) * (1000 + 70_000 * i))
    relay.get(paths[1])  # one of them cached already: hits and misses interleave
    wanted = [paths[0], paths[1], "/etc/passwd", *paths[2:]]
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(relay.socket))
        # All requests in one write, as apt's pipeline sends them.
        conn.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n".encode()
                              for p in wanted))
        reader = conn.makefile("rb")
        answers = [_read_response(reader) for _ in wanted]
    assert [status for status, _ in answers] == [200, 200, 403, 200, 200, 200, 200]
    for path, (status, body) in zip(wanted, answers, strict=True):
        if status == 200:
            assert body == world.files[path][0]


class _Unclosable:
    """A file http.client may 'close' after each response without ending the stream."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def close(self) -> None:
        pass


class _Sock:
    def __init__(self, file: Any) -> None:
        self.file = _Unclosable(file)

    def makefile(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.file


def _read_response(reader: Any) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(_Sock(reader), method="GET")  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read()


def test_keep_alive_serves_many_requests_on_one_connection(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"release")
    conn = relay.connect()
    for _ in range(3):
        conn.request("GET", INRELEASE)
        response = conn.getresponse()
        assert response.read() == b"release"
        assert not response.will_close
    conn.close()


def test_refuses_everything_but_get_and_head_of_the_archive(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"release")
    for method, path in [("GET", "/"), ("GET", "/etc/passwd"), ("GET", "/debian/../x"),
                         ("GET", "http://example.org/debian/x"), ("POST", INRELEASE),
                         ("PUT", INRELEASE), ("DELETE", INRELEASE), ("OPTIONS", INRELEASE)]:
        status, _, _ = relay.get(path, method=method)
        assert status == 403, (method, path)
    assert world.asked() == 0
    status, headers, body = relay.get(INRELEASE, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "7", b"")
    assert relay.stats(9).refused == 8


def test_connect_is_refused_and_the_connection_closed(relay: Relay) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(relay.socket))
        conn.sendall(b"CONNECT deb.debian.org:443 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /debian/x HTTP/1.1\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 403")
    assert data.count(b"HTTP/1.1") == 1  # nothing after the refused CONNECT was read as a request


def test_index_files_are_revalidated_after_the_ttl(
    relay_factory: Any, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"v1", ETag='"v1"', Last_Modified="Sat, 10 Aug 2024 09:00:00 GMT")
    world.put(DEB, b"deb")
    relay = relay_factory(ttl=0.0)
    assert relay.get(INRELEASE)[2] == b"v1"
    assert relay.get(DEB)[2] == b"deb"
    # Unchanged upstream: a conditional GET, answered 304, the body comes from the cache.
    status, headers, body = relay.get(INRELEASE)
    assert (status, headers["X-Cache"], body) == (200, "REVALIDATED", b"v1")
    assert world.requests[-1][2].get("If-None-Match") == '"v1"'
    # Changed upstream: the new version, cached.
    world.put(INRELEASE, b"v2", ETag='"v2"')
    assert relay.get(INRELEASE)[2] == b"v2"
    # .deb files are never revalidated.
    assert relay.get(DEB)[1]["X-Cache"] == "HIT"
    assert world.asked(DEB) == 1
    stats = relay.stats(5)
    assert (stats.misses, stats.revalidated, stats.hits) == (3, 1, 1)
    assert stats.upstream_bytes == len(b"v1deb" + b"v2")


def test_index_files_are_fresh_within_the_ttl(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"v1", ETag='"v1"')
    relay.get(INRELEASE)
    assert relay.get(INRELEASE)[1]["X-Cache"] == "HIT"
    assert world.asked(INRELEASE) == 1


def test_a_client_asking_for_fresh_copies_gets_index_files_revalidated(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    """apt's Acquire::http::No-Cache sends Cache-Control: no-cache: index files are asked
    upstream again within the TTL; immutable files stay cached."""
    world, _ = archive
    world.put(INRELEASE, b"v1", ETag='"v1"')
    world.put(DEB, b"deb")
    relay.get(INRELEASE)
    relay.get(DEB)
    fresh = {"Cache-Control": "no-cache", "Pragma": "no-cache"}
    assert relay.get(INRELEASE, headers=fresh)[1]["X-Cache"] == "REVALIDATED"
    assert relay.get(DEB, headers=fresh)[1]["X-Cache"] == "HIT"
    assert (world.asked(INRELEASE), world.asked(DEB)) == (2, 1)
    assert wants_refresh("no-cache", "") and wants_refresh("", "no-cache")
    # apt asks every InRelease with max-age=0: that alone must not defeat the cache.
    assert not wants_refresh("max-age=0", "") and not wants_refresh("max-age=3600", "")


def test_client_conditional_requests_get_304(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"v1", ETag='"v1"', Last_Modified="Sat, 10 Aug 2024 09:00:00 GMT")
    relay.get(INRELEASE)
    status, headers, body = relay.get(
        INRELEASE, headers={"If-Modified-Since": "Sat, 10 Aug 2024 09:00:00 GMT"})
    assert (status, body, headers["ETag"]) == (304, b"", '"v1"')
    assert relay.get(INRELEASE, headers={"If-None-Match": '"v0"'})[0] == 200


def test_upstream_down_serves_stale_index_and_cached_debs(
    relay_factory: Any, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"v1", ETag='"v1"')
    world.put(DEB, b"deb")
    warm = relay_factory(ttl=0.0)
    warm.get(INRELEASE)
    warm.get(DEB)
    # The same cache, but upstream is a port where nothing listens.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", probe.getsockname()[1])
    cold = relay_factory(ttl=0.0, upstream=dead)
    status, headers, body = cold.get(INRELEASE)
    assert (status, headers["X-Cache"], body) == (200, "STALE", b"v1")
    assert cold.get(DEB)[1]["X-Cache"] == "HIT"
    status, _, body = cold.get("/debian/pool/main/n/new/new_1_amd64.deb")
    assert status == 502 and b"failed" in body
    stats = cold.stats(3)
    assert (stats.stale, stats.hits, stats.errors) == (1, 1, 1)


def test_upstream_errors(
    relay_factory: Any, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    relay = relay_factory(upstream_timeout=0.5)
    status, _, body = relay.get("/debian/pool/missing.deb")
    assert (status, body) == (404, b"not here\n")  # 404 passes through, with its body
    world.mode = "500"
    assert relay.get(DEB)[0] == 502
    world.mode = "hang"
    started = time.monotonic()
    assert relay.get(INRELEASE)[0] == 502
    assert time.monotonic() - started < 2.5  # the upstream timeout, not the upstream's hang
    stats = relay.stats(3)
    assert (stats.not_found, stats.errors) == (1, 2)
    assert not (relay.cache / DEB.lstrip("/")).exists()


def test_a_download_cut_short_is_never_cached(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    body = os.urandom(500_000)
    world.put(DEB, body)
    world.mode = "cut"
    conn = relay.connect()
    conn.request("GET", DEB)
    response = conn.getresponse()
    assert response.status == 200  # the headers went out before the cut
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    assert not (relay.cache / DEB.lstrip("/")).exists()
    assert list((relay.cache / ".tmp").iterdir()) == []
    world.mode = "ok"
    status, headers, got = relay.get(DEB)
    assert (status, headers["X-Cache"], got) == (200, "MISS", body)


def test_an_answer_without_length_is_spooled_then_served(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    body = os.urandom(10_500)
    world.put(DEB, body)
    world.mode = "chunked"
    status, headers, got = relay.get(DEB)
    assert (status, headers["Content-Length"], got) == (200, str(len(body)), body)
    assert relay.get(DEB)[1]["X-Cache"] == "HIT"


def test_concurrent_downloads_of_one_file(
    relay_factory: Any, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    body = os.urandom(2_000_000)
    world.put(DEB, body)
    relays = [relay_factory(), relay_factory()]  # two labs sharing one cache
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: relays[i % 2].get(DEB), range(8)))
    assert all(status == 200 and got == body for status, _, got in results)
    assert relays[0].get(DEB)[2] == body
    cached = relays[0].cache / DEB.lstrip("/")
    assert cached.read_bytes()[: len(body)] == body
    assert list((relays[0].cache / ".tmp").iterdir()) == []


def test_a_damaged_entry_is_fetched_again(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(DEB, b"good")
    relay.get(DEB)
    (relay.cache / DEB.lstrip("/")).write_bytes(b"truncated")
    status, headers, body = relay.get(DEB)
    assert (status, headers["X-Cache"], body) == (200, "MISS", b"good")


def test_the_uplink_delay_holds_back_each_answer(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    world.put(INRELEASE, b"x")
    relay.get(INRELEASE)
    relay.uplink_file.write_text(Uplink(None, 300).to_json())
    started = time.monotonic()
    relay.get(INRELEASE)
    assert time.monotonic() - started >= 0.3
    relay.uplink_file.unlink()
    started = time.monotonic()
    relay.get(INRELEASE)
    assert time.monotonic() - started < 0.3


def test_the_socket_is_for_root_only(relay: Relay) -> None:
    assert relay.socket.stat().st_mode & 0o777 == 0o600


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_large_files_are_streamed_not_held_in_memory(
    relay: Relay, archive: tuple[FakeArchive, tuple[str, int]]
) -> None:
    world, _ = archive
    size = 100 * 1024 * 1024
    world.generated[DEB] = size
    peak = [_rss_bytes()]
    baseline = peak[0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for expected in ("MISS", "HIT"):
            conn = relay.connect()
            conn.request("GET", DEB)
            response = conn.getresponse()
            assert response.getheader("X-Cache") == expected
            received = 0
            while chunk := response.read(1 << 20):
                received += len(chunk)
            conn.close()
            assert received == size
    finally:
        done.set()
        watcher.join()
    # Relay, stand-in archive and client all run in this process: together they
    # may hold a few buffers, never the 100 MB file.
    assert peak[0] - baseline < 40 * 1024 * 1024, f"RSS grew by {(peak[0] - baseline) >> 20} MiB"

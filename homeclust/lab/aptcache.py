"""The internet host's package mirror: a small caching relay for Debian's archive.

Lab nodes install from ``http://deb.debian.org``, which the lab's DNS points
at the internet host; a ``socat`` there hands each connection through a Unix
socket to this relay, which runs in the machine's own namespace and is the
only thing that talks to the real archive.  Repeated test runs must not
download the same packages again and again, so the relay keeps what it
fetched, on disk, shared by every lab on the machine::

    python -m homeclust.lab aptcache --socket PATH --cache DIR --stats FILE.jsonl
                                     [--uplink FILE] [--ttl SECONDS] [--upstream HOST:PORT]

What it serves, and how:

* Only ``GET``/``HEAD`` of paths under ``/debian/`` and ``/debian-security/``,
  always from the fixed upstream ``deb.debian.org:80``.  Anything else is
  answered 403: this must never become an open proxy.
* HTTP/1.1 with keep-alive; apt's pipelined requests are answered in order
  (one handler thread per connection, reading requests one after another from
  the connection's buffer).  ``Range`` is ignored -- a full 200 answer is
  always a correct one, and apt handles it.
* Cache entries are files under the cache directory named by the archive
  path.  An entry is written to ``.tmp/``, fsynced and renamed into place, so
  concurrent relays (one per lab) never see -- or serve -- a partial download.
  Its metadata (length, type, Last-Modified, ETag) is a trailer at the end of
  the same file, so one rename publishes body and metadata together.  The
  file's mtime is when upstream last confirmed it.
* ``pool/`` files (``.deb``) and ``by-hash/`` paths never change: cached for
  ever.  Everything else (InRelease, Release, Packages*, Translation-*, ...)
  is revalidated with a conditional GET once older than the TTL (10 minutes),
  and served from the cache if upstream is unreachable.
* Upstream 404 passes through; 5xx, timeouts and connection failures become
  502 with a log line that says why.
* Large files are streamed (64 KiB at a time, ``sendfile`` for hits), never
  held in memory.
* Every request adds one JSON line to the stats file (the lab's
  ``logs/apt-cache.jsonl``): what was asked, how it was served (hit, miss,
  revalidated, stale, ...) and the bytes that came from upstream.  That is
  what proves "the second run downloaded nothing" (``Lab.apt_cache_stats``).
* ``--uplink``: the lab's uplink setting (uplink.py); its delay is added
  before each response here, because the kernel may lack ``netem``.

The functions above the I/O section are pure and unit-tested.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import http.client
import json
import os
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from enum import Enum, StrEnum
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any

from homeclust.lab.uplink import Uplink

UPSTREAM_HOST = "deb.debian.org"
UPSTREAM_PORT = 80
ALLOWED_PREFIXES = ("/debian/", "/debian-security/")
INDEX_TTL = 600.0  # seconds an index file is served without asking upstream
UPSTREAM_TIMEOUT = 30.0  # per connect and per read: a stalled upstream is an error
CLIENT_IDLE_TIMEOUT = 300.0  # an idle keep-alive connection (or a stuck client) is closed
CHUNK = 64 * 1024
MAX_CONNECTIONS = 64
MAX_PATH = 1024
TMP_DIR = ".tmp"
TMP_MAX_AGE = 24 * 3600.0  # older temp files are debris of a crash (no download lasts a day)

TRAILER_MAGIC = b"HCAPT01\n"
_TRAILER_FIXED = struct.calcsize(">I") + len(TRAILER_MAGIC)

# Headers of upstream's answer that describe the entity (and so are kept).
_ENTITY_HEADERS = ("Content-Type", "Last-Modified", "ETag")


class Kind(Enum):
    IMMUTABLE = "immutable"  # pool/ files and by-hash/ paths: content never changes
    INDEX = "index"  # anything else: may change, revalidate after the TTL


class Outcome(StrEnum):
    """How one request was served (the ``cache`` field of a stats line)."""

    HIT = "hit"  # from the cache, upstream not asked
    MISS = "miss"  # fetched from upstream (and cached)
    REVALIDATED = "revalidated"  # upstream said 304: served from the cache
    STALE = "stale"  # upstream failed: served an expired copy from the cache
    NOT_FOUND = "notfound"  # upstream 404, passed through
    PASSED = "pass"  # other upstream answers (HEAD, 3xx, 4xx), passed through, not cached
    REFUSED = "refused"  # not ours to relay: 403
    ERROR = "error"  # upstream failed and nothing cached: 502 (or a cut-off stream)


# --------------------------------------------------------------------------
# Pure: request targets, cache paths, freshness, headers, stats
# --------------------------------------------------------------------------


def canonical_path(target: str) -> str | None:
    """The archive path a request target names, or None if the relay must refuse it.

    Percent-encoding is decoded once (apt writes ``+`` as ``%2b``), so every
    spelling of a file maps to one cache entry.  Refused: other hosts
    (absolute-form targets), queries, paths outside the two archives, and any
    segment that is empty, ``.``-leading (``..`` included: the cache path must
    stay inside the cache) or holds control characters.
    """
    if target[:7].lower() == "http://":
        host, _, rest = target[7:].partition("/")
        if host.lower() not in (UPSTREAM_HOST, f"{UPSTREAM_HOST}:{UPSTREAM_PORT}"):
            return None
        target = "/" + rest
    if not target.startswith("/") or "?" in target or "#" in target:
        return None
    try:
        path = urllib.parse.unquote(target, errors="strict")
    except UnicodeDecodeError:
        return None
    if len(path) > MAX_PATH or not path.startswith(ALLOWED_PREFIXES):
        return None
    for segment in path[1:].split("/"):
        if (not segment or segment.startswith(".") or len(segment.encode()) > 255
                or any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in segment)):
            return None
    return path


def upstream_target(path: str) -> str:
    """The request target to send upstream for a canonical path."""
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~")


def classify(path: str) -> Kind:
    parts = path.split("/")
    if "by-hash" in parts or (len(parts) > 2 and parts[2] == "pool") \
            or path.endswith((".deb", ".udeb")):
        return Kind.IMMUTABLE
    return Kind.INDEX


def cache_file(cache_dir: Path, path: str) -> Path:
    """Where the entry for a canonical path lives (always inside ``cache_dir``)."""
    return cache_dir / path.lstrip("/")


def wants_refresh(cache_control: str, pragma: str) -> bool:
    """Whether a request insists on a fresh copy (``no-cache``).

    apt sends ``max-age=0`` for every InRelease as a matter of course; honouring it
    would make the cache useless for index files, so only an explicit ``no-cache``
    (apt's ``Acquire::http::No-Cache``) counts."""
    directives = {d.strip().lower() for d in cache_control.split(",")}
    return "no-cache" in directives or pragma.strip().lower() == "no-cache"


def is_fresh(kind: Kind, validated_at: float, now: float, ttl: float) -> bool:
    """May an entry be served without asking upstream?  (A clock jump back counts as stale.)"""
    return kind is Kind.IMMUTABLE or 0 <= now - validated_at < ttl


@dataclass(frozen=True)
class EntryMeta:
    """What a cache entry knows about its body (stored in the entry's trailer)."""

    path: str
    length: int
    content_type: str = "application/octet-stream"
    last_modified: str | None = None
    etag: str | None = None

    @classmethod
    def from_headers(cls, path: str, length: int, headers: Iterable[tuple[str, str]]) -> EntryMeta:
        found = {name.lower(): value for name, value in headers}
        return cls(path=path, length=length,
                   content_type=found.get("content-type") or "application/octet-stream",
                   last_modified=found.get("last-modified"), etag=found.get("etag"))


def encode_trailer(meta: EntryMeta) -> bytes:
    """What follows the body in an entry file: JSON metadata, its length, a magic."""
    data = json.dumps(asdict(meta), sort_keys=True).encode()
    return data + struct.pack(">I", len(data)) + TRAILER_MAGIC


def decode_trailer(tail: bytes, file_size: int) -> EntryMeta | None:
    """The metadata from the last bytes of an entry file, or None if it is not a whole entry.

    ``tail`` must end where the file ends and hold at least the whole trailer.
    """
    if len(tail) < _TRAILER_FIXED or not tail.endswith(TRAILER_MAGIC):
        return None
    (size,) = struct.unpack(">I", tail[-_TRAILER_FIXED:-len(TRAILER_MAGIC)])
    if size + _TRAILER_FIXED > len(tail):
        return None
    try:
        raw = json.loads(tail[-_TRAILER_FIXED - size:-_TRAILER_FIXED])
        meta = EntryMeta(**{f.name: raw[f.name] for f in fields(EntryMeta) if f.name in raw})
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if meta.length < 0 or meta.length + size + _TRAILER_FIXED != file_size:
        return None
    return meta


def trailer_size_hint(file_size: int) -> int:
    """How many bytes from the end to read to get a whole trailer (metadata is small)."""
    return min(file_size, 8192)


def conditional_headers(meta: EntryMeta) -> dict[str, str]:
    """Headers that ask upstream "has it changed since our copy?"."""
    headers: dict[str, str] = {}
    if meta.etag:
        headers["If-None-Match"] = meta.etag
    if meta.last_modified:
        headers["If-Modified-Since"] = meta.last_modified
    return headers


def client_has_current(meta: EntryMeta, if_none_match: str | None,
                       if_modified_since: str | None) -> bool:
    """Whether a client's conditional request is answered by 304 (RFC 9110 13.2.2)."""
    if if_none_match is not None:
        if not meta.etag:
            return False
        wanted = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in wanted or meta.etag.removeprefix("W/") in wanted
    if if_modified_since and meta.last_modified:
        since, modified = _http_date(if_modified_since), _http_date(meta.last_modified)
        return since is not None and modified is not None and modified <= since
    return False


def _http_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def upstream_length(headers: Iterable[tuple[str, str]]) -> int | None:
    """The body length upstream announced, or None (chunked or absent: spool first)."""
    found = {name.lower(): value for name, value in headers}
    if "chunked" in found.get("transfer-encoding", "").lower():
        return None
    try:
        length = int(found.get("content-length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


@dataclass(frozen=True)
class AptCacheStats:
    """Counters from a relay's stats log (``Lab.apt_cache_stats``); subtract two to diff."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    revalidated: int = 0
    stale: int = 0
    not_found: int = 0
    passed: int = 0
    refused: int = 0
    errors: int = 0
    upstream_requests: int = 0
    upstream_bytes: int = 0  # body bytes received from the real archive
    client_bytes: int = 0  # body bytes sent to the lab

    @property
    def from_cache(self) -> int:
        return self.hits + self.revalidated + self.stale

    def __sub__(self, other: AptCacheStats) -> AptCacheStats:
        return AptCacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                                for f in fields(self)})

    def describe(self) -> str:
        return (f"{self.requests} requests: {self.hits} hits, {self.revalidated} revalidated, "
                f"{self.misses} misses, {self.stale} stale, {self.errors} errors, "
                f"{self.refused} refused; {self.upstream_bytes / 1e6:.1f} MB from upstream, "
                f"{self.client_bytes / 1e6:.1f} MB served")


_OUTCOME_FIELD = {
    Outcome.HIT: "hits", Outcome.MISS: "misses", Outcome.REVALIDATED: "revalidated",
    Outcome.STALE: "stale", Outcome.NOT_FOUND: "not_found", Outcome.PASSED: "passed",
    Outcome.REFUSED: "refused", Outcome.ERROR: "errors",
}


def summarize(lines: Iterable[str]) -> AptCacheStats:
    """Add up a stats log (JSON lines; other lines and a torn last line are skipped)."""
    counts = {f.name: 0 for f in fields(AptCacheStats)}
    for line in lines:
        try:
            record = json.loads(line)
            outcome = Outcome(record["cache"])
        except (ValueError, KeyError, TypeError):
            continue
        counts["requests"] += 1
        counts[_OUTCOME_FIELD[outcome]] += 1
        for name in ("upstream_requests", "upstream_bytes", "client_bytes"):
            value = record.get(name, 0)
            counts[name] += value if isinstance(value, int) else 0
    return AptCacheStats(**counts)


# --------------------------------------------------------------------------
# I/O: the disk cache
# --------------------------------------------------------------------------


@dataclass
class Entry:
    """An open cache entry: the file stays valid even if another relay replaces it."""

    file: IO[bytes]
    meta: EntryMeta
    validated_at: float

    def close(self) -> None:
        self.file.close()


class EntryWriter:
    """A new entry, written to a temp file and published by ``commit`` only."""

    def __init__(self, cache: DiskCache, path: str) -> None:
        self.cache, self.path = cache, path
        self.tmp = cache.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        self.file: IO[bytes] | None = open(self.tmp, "xb")  # noqa: SIM115 -- closed in commit/abort
        self.written = 0

    def write(self, data: bytes) -> None:
        if self.file is None:
            raise OSError(f"cache entry for {self.path} already closed")
        self.file.write(data)
        self.written += len(data)

    def commit(self, meta: EntryMeta) -> Path:
        """fsync, then rename into place: readers see the old entry or the whole new one."""
        if self.file is None or meta.length != self.written:
            self.abort()
            raise OSError(f"cache entry for {self.path}: {self.written} bytes written, "
                          f"{meta.length} announced")
        self.file.write(encode_trailer(meta))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        target = cache_file(self.cache.root, self.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, target)
        except OSError:
            self.abort()
            raise
        _fsync_dir(target.parent)
        return target

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / TMP_DIR
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def open(self, path: str) -> Entry | None:
        """The entry for ``path`` if there is a whole one."""
        try:
            file = open(cache_file(self.root, path), "rb")  # noqa: SIM115 -- owned by the Entry
        except OSError:  # absent, or a directory where a file should be
            return None
        try:
            stat = os.fstat(file.fileno())
            hint = trailer_size_hint(stat.st_size)
            file.seek(stat.st_size - hint)
            meta = decode_trailer(file.read(hint), stat.st_size)
        except OSError:
            meta = None
        if meta is None or meta.path != path:
            file.close()
            return None
        file.seek(0)
        return Entry(file, meta, stat.st_mtime)

    def writer(self, path: str) -> EntryWriter:
        return EntryWriter(self, path)

    def touch(self, path: str) -> None:
        """Upstream confirmed the entry: it is fresh for another TTL."""
        with contextlib.suppress(OSError):
            os.utime(cache_file(self.root, path))

    def remove(self, path: str) -> None:
        with contextlib.suppress(OSError):
            cache_file(self.root, path).unlink()

    def clean_tmp(self, max_age: float = TMP_MAX_AGE) -> int:
        """Remove temp files a crashed relay left (other relays' current ones are young)."""
        removed = 0
        cutoff = time.time() - max_age
        for tmp in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
        return removed


# --------------------------------------------------------------------------
# I/O: upstream, logs, the uplink setting
# --------------------------------------------------------------------------


class UpstreamError(Exception):
    """Upstream could not be asked or did not answer properly (-> 502 or a stale copy)."""


class Upstream:
    """One keep-alive connection to the archive, per client connection."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str,
                headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        all_headers = {"Host": UPSTREAM_HOST, "User-Agent": "homeclust-lab-aptcache",
                       **(headers or {})}
        for _attempt in range(2):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, upstream_target(path), headers=all_headers)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if not reused:
                    raise UpstreamError(f"connection lost: {exc}") from None
                # A kept-alive connection upstream closed meanwhile: once more, on a new one.
            except TimeoutError:
                self.close()
                raise UpstreamError(f"timed out after {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise UpstreamError(str(exc) or type(exc).__name__) from None
        raise UpstreamError("connection lost twice")

    def finished(self, response: http.client.HTTPResponse) -> None:
        """A response not read to its end leaves the connection unusable: drop it."""
        if response.will_close or not response.isclosed():
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class StatsLog:
    """JSON lines, one per request; threads append whole lines under a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the process's life
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.lock:
            self.file.write(line)
            self.file.flush()


class UplinkSetting:
    """The lab's ``run/uplink.json``, re-read when it changes (a stat per request)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.seen: tuple[int, int] | None = None
        self.uplink = Uplink()

    def delay(self) -> float:
        if self.path is None:
            return 0.0
        try:
            stat = self.path.stat()
        except OSError:
            self.seen, self.uplink = None, Uplink()
            return 0.0
        if (stat.st_mtime_ns, stat.st_size) != self.seen:
            with contextlib.suppress(OSError):
                self.uplink = Uplink.from_json(self.path.read_text())
                self.seen = (stat.st_mtime_ns, stat.st_size)
        return self.uplink.delay_ms / 1000


def say(message: str) -> None:
    """A line for people, in the service's log."""
    print(f"[homeclust-lab aptcache] {time.strftime('%H:%M:%S')} {message}", flush=True)


# --------------------------------------------------------------------------
# I/O: the HTTP side
# --------------------------------------------------------------------------


@dataclass
class _Record:
    method: str
    target: str
    status: int = 0
    cache: Outcome = Outcome.ERROR
    upstream_requests: int = 0
    upstream_bytes: int = 0
    client_bytes: int = 0
    note: str = ""
    started: float = field(default_factory=time.monotonic)

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "t": round(time.time(), 3), "method": self.method, "path": self.target[:MAX_PATH],
            "status": self.status, "cache": self.cache.value,
            "upstream_requests": self.upstream_requests, "upstream_bytes": self.upstream_bytes,
            "client_bytes": self.client_bytes,
            "ms": round((time.monotonic() - self.started) * 1000),
        }
        if self.note:
            record["note"] = self.note
        return record


class _ClientGone(Exception):
    """The client went away while we were answering."""


class RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "homeclust-lab-aptcache"
    timeout = CLIENT_IDLE_TIMEOUT
    server: RelayServer

    def setup(self) -> None:
        super().setup()
        host, port = self.server.upstream_address
        self.upstream = Upstream(host, port, self.server.upstream_timeout)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.upstream.close()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # every request is in the stats log already

    def log_message(self, format: str, *args: Any) -> None:
        # Requests go to the stats log; only protocol errors (bad request line, ...) land here.
        say(format % args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.command not in ("GET", "HEAD"):
            # No body is read, so the connection cannot carry another request.
            record = _Record(self.command, self.path)
            self._refuse(record, close=True)
            self.server.stats.write(record.as_json())
            return False
        return True

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    # -- one request ------------------------------------------------------

    def _handle(self, head: bool) -> None:
        record = _Record(self.command, self.path)
        if self.headers.get("Content-Length", "0") not in ("", "0") \
                or "Transfer-Encoding" in self.headers:
            # A body we will not read would be taken for the next request.
            self.close_connection = True
        delay = self.server.uplink.delay()
        if delay:
            time.sleep(delay)
        try:
            path = canonical_path(self.path)
            if path is None:
                self._refuse(record, close=False)
                return
            entry = self.server.cache.open(path)
            # A client asking for a fresh copy (apt's Acquire::http::No-Cache) gets index
            # files revalidated now; immutable files never change, so they stay cached.
            refresh = wants_refresh(self.headers.get("Cache-Control", ""),
                                    self.headers.get("Pragma", ""))
            try:
                if entry is not None and is_fresh(classify(path), entry.validated_at, time.time(),
                                                  0.0 if refresh else self.server.ttl):
                    self._send_entry(entry, head, Outcome.HIT, record)
                else:
                    self._ask_upstream(path, entry, head, record)
            finally:
                if entry is not None:
                    entry.close()
        except _ClientGone:
            self.close_connection = True
            record.note = record.note or "client went away"
        finally:
            self.server.stats.write(record.as_json())

    def _ask_upstream(self, path: str, entry: Entry | None, head: bool, record: _Record) -> None:
        headers = conditional_headers(entry.meta) if entry is not None else {}
        record.upstream_requests += 1
        try:
            response = self.upstream.request("HEAD" if head else "GET", path, headers)
        except UpstreamError as exc:
            self._upstream_failed(path, entry, head, record, str(exc))
            return
        try:
            status = response.status
            if status >= 500:
                self._upstream_failed(path, entry, head, record,
                                      f"upstream answered {status} {response.reason}")
            elif status == 304 and entry is not None:
                self.server.cache.touch(path)
                self._send_entry(entry, head, Outcome.REVALIDATED, record)
            elif status == 200 and not head:
                self._relay_and_store(path, response, record)
            else:
                if status == 404 and entry is not None:
                    self.server.cache.remove(path)  # gone upstream: gone here
                outcome = Outcome.NOT_FOUND if status == 404 else Outcome.PASSED
                self._pass_through(response, head, outcome, record)
        finally:
            self.upstream.finished(response)

    def _upstream_failed(self, path: str, entry: Entry | None, head: bool, record: _Record,
                         why: str) -> None:
        if entry is not None:
            say(f"{self.command} {path}: {why}; serving the cached copy (stale)")
            record.note = why
            self._send_entry(entry, head, Outcome.STALE, record)
            return
        say(f"{self.command} {path}: {why} -> 502")
        record.note = why
        self._send_simple(502, f"upstream {UPSTREAM_HOST} failed: {why}\n", record, Outcome.ERROR,
                          head=head)

    # -- answers ------------------------------------------------------------

    def _refuse(self, record: _Record, close: bool) -> None:
        if close:
            self.close_connection = True
        self._send_simple(403, "homeclust lab archive relay: only GET and HEAD of "
                               "/debian/... and /debian-security/... on deb.debian.org\n",
                          record, Outcome.REFUSED, head=self.command == "HEAD")

    def _send_simple(self, status: int, text: str, record: _Record, outcome: Outcome,
                     head: bool = False) -> None:
        body = text.encode()
        record.status, record.cache = status, outcome
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self._write(body, record)

    def _send_entry(self, entry: Entry, head: bool, outcome: Outcome, record: _Record) -> None:
        meta = entry.meta
        record.cache = outcome
        if client_has_current(meta, self.headers.get("If-None-Match"),
                              self.headers.get("If-Modified-Since")):
            record.status = 304
            self.send_response(304)
            self._entity_headers(meta.etag, meta.last_modified, outcome)
            self.end_headers()
            return
        record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", meta.content_type)
        self.send_header("Content-Length", str(meta.length))
        self._entity_headers(meta.etag, meta.last_modified, outcome)
        self.end_headers()
        if head or meta.length == 0:
            return
        try:
            sent = self.connection.sendfile(entry.file, 0, meta.length)
        except OSError as exc:
            raise _ClientGone() from exc
        record.client_bytes += sent
        if sent != meta.length:
            raise _ClientGone()

    def _entity_headers(self, etag: str | None, last_modified: str | None,
                        outcome: Outcome) -> None:
        if etag:
            self.send_header("ETag", etag)
        if last_modified:
            self.send_header("Last-Modified", last_modified)
        self.send_header("X-Cache", outcome.value.upper())
        if self.close_connection:
            self.send_header("Connection", "close")

    def _pass_through(self, response: http.client.HTTPResponse, head: bool, outcome: Outcome,
                      record: _Record) -> None:
        """An answer we do not cache (404, HEAD, redirects, ...): its status and a small body."""
        body = b"" if head else response.read(CHUNK)
        record.upstream_bytes += len(body)
        record.status, record.cache = response.status, outcome
        self.send_response(response.status)
        for name in _ENTITY_HEADERS:
            value = response.getheader(name)
            if value:
                self.send_header(name, value)
        if head:
            length = response.getheader("Content-Length")
            if length:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(body)))
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            self.send_header("Location", response.getheader("Location") or "")
        self.send_header("X-Cache", outcome.value.upper())
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self._write(body, record)

    def _relay_and_store(self, path: str, response: http.client.HTTPResponse,
                         record: _Record) -> None:
        """A 200 from upstream: to the client and into the cache at the same time."""
        record.cache = Outcome.MISS
        headers = response.getheaders()
        length = upstream_length(headers)
        try:
            writer: EntryWriter | None = self.server.cache.writer(path)
        except OSError as exc:
            say(f"cannot cache {path}: {exc}")
            writer = None
        if length is None:
            self._spool_then_send(path, response, writer, headers, record)
            return
        meta = EntryMeta.from_headers(path, length, headers)
        record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", meta.content_type)
        self.send_header("Content-Length", str(length))
        self._entity_headers(meta.etag, meta.last_modified, Outcome.MISS)
        self.end_headers()
        client_ok = True
        # The last chunk is held back until the entry is published: a client
        # that has the whole file finds it in the cache when it asks again.
        held = b""
        try:
            while record.upstream_bytes < length:
                try:
                    chunk = response.read(min(CHUNK, length - record.upstream_bytes))
                except (OSError, http.client.HTTPException) as exc:
                    raise UpstreamError(str(exc) or type(exc).__name__) from None
                if not chunk:
                    raise UpstreamError(
                        f"upstream closed after {record.upstream_bytes} of {length} bytes")
                record.upstream_bytes += len(chunk)
                if writer is not None:
                    writer.write(chunk)
                if client_ok and held:
                    # A client that hangs up does not stop the download: the next
                    # client (apt retries at once) gets it from the cache.
                    client_ok = self._try_write(held, record)
                held = chunk
        except UpstreamError as exc:
            if writer is not None:
                writer.abort()
            say(f"GET {path}: {exc}; the client's copy is cut short")
            record.cache, record.note = Outcome.ERROR, str(exc)
            self.close_connection = True  # the client must see the answer end early
            return
        self._commit(writer, meta)
        if client_ok and held:
            client_ok = self._try_write(held, record)
        if not client_ok:
            raise _ClientGone()

    def _spool_then_send(self, path: str, response: http.client.HTTPResponse,
                         writer: EntryWriter | None, headers: list[tuple[str, str]],
                         record: _Record) -> None:
        """No length from upstream: download whole into the cache, then answer from it."""
        if writer is None:
            self._send_simple(502, "cannot spool an answer without Content-Length\n", record,
                              Outcome.ERROR)
            return
        try:
            while chunk := response.read(CHUNK):
                record.upstream_bytes += len(chunk)
                writer.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            writer.abort()
            self._upstream_failed(path, None, False, record, str(exc) or type(exc).__name__)
            return
        target = self._commit(writer, EntryMeta.from_headers(path, writer.written, headers))
        entry = self.server.cache.open(path) if target is not None else None
        if entry is None:
            self._send_simple(502, "could not keep the download\n", record, Outcome.ERROR)
            return
        try:
            self._send_entry(entry, False, Outcome.MISS, record)
        finally:
            entry.close()

    def _commit(self, writer: EntryWriter | None, meta: EntryMeta) -> Path | None:
        if writer is None:
            return None
        try:
            return writer.commit(meta)
        except OSError as exc:
            say(f"cannot cache {meta.path}: {exc}")
            return None

    def _write(self, data: bytes, record: _Record) -> None:
        if not self._try_write(data, record):
            raise _ClientGone()

    def _try_write(self, data: bytes, record: _Record) -> bool:
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
            return False
        record.client_bytes += len(data)
        return True


class RelayServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, at most MAX_CONNECTIONS at a time (then accept waits)."""

    daemon_threads = True

    def __init__(self, socket_path: Path, cache: DiskCache, stats: StatsLog,
                 uplink: UplinkSetting, upstream: tuple[str, int] = (UPSTREAM_HOST, UPSTREAM_PORT),
                 ttl: float = INDEX_TTL, upstream_timeout: float = UPSTREAM_TIMEOUT) -> None:
        self.cache, self.stats, self.uplink = cache, stats, uplink
        self.upstream_address, self.ttl, self.upstream_timeout = upstream, ttl, upstream_timeout
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        socket_path.unlink(missing_ok=True)  # a previous relay's socket
        old_umask = os.umask(0o177)  # the socket is born 0600: only root may use it
        try:
            super().__init__(str(socket_path), RelayHandler)
        finally:
            os.umask(old_umask)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that vanished mid-answer: nothing to report
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(socket_path: Path, cache_dir: Path, stats_file: Path, uplink_file: Path | None = None,
            upstream: tuple[str, int] = (UPSTREAM_HOST, UPSTREAM_PORT), ttl: float = INDEX_TTL,
            upstream_timeout: float = UPSTREAM_TIMEOUT) -> Iterator[RelayServer]:
    """A relay serving in a background thread (for tests); stopped on exit."""
    server = RelayServer(socket_path, DiskCache(cache_dir), StatsLog(stats_file),
                         UplinkSetting(uplink_file), upstream, ttl, upstream_timeout)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m homeclust.lab aptcache",
                                     description="The lab's caching relay for Debian's archive.")
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")
    parser.add_argument("--cache", required=True, type=Path, help="cache directory")
    parser.add_argument("--stats", required=True, type=Path, help="JSON-lines stats log")
    parser.add_argument("--uplink", type=Path, help="the lab's uplink.json (for its delay)")
    parser.add_argument("--ttl", type=float, default=INDEX_TTL,
                        help="seconds before an index file is revalidated")
    parser.add_argument("--upstream", default=f"{UPSTREAM_HOST}:{UPSTREAM_PORT}",
                        help=argparse.SUPPRESS)  # for tests: a local stand-in for the archive
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    cache = DiskCache(args.cache)
    removed = cache.clean_tmp()
    server = RelayServer(args.socket, cache, StatsLog(args.stats), UplinkSetting(args.uplink),
                         (host, int(port)), args.ttl)
    say(f"relaying {args.socket} -> {host}:{port}, cache {args.cache} (index TTL {args.ttl:g} s"
        + (f", removed {removed} stale temp files" if removed else "") + ")")
    with server:
        server.serve_forever()
    return 0

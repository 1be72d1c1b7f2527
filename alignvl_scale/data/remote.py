"""Shards where clusters keep them: `http(s)://`, `s3://` and `gs://` URLs read as streams that
survive the failures object stores produce as a matter of course.

A transfer that breaks (a reset connection, a read past its timeout, a body cut short, a 5xx,
429 or 503 SlowDown) is reopened at the byte it reached (an HTTP Range request; an object
store's ranged read), after a backoff, so that the tar parser above never sees the break and
an epoch reads exactly the samples an unbroken read would. What stays unreachable (404, 403,
the retries spent) raises `Unreachable`, which the reader counts as an `unreachable_shard`
skip naming the URL and the reason. Every read has connect and read timeouts (gs://: gcsfs's
own): nothing hangs.

    http(s)://   urllib (no dependency); credentials, if any, in the URL or a proxy
    s3://, gs:// fsspec with s3fs / gcsfs (the `[cloud]` extra); each reads its store's own
                 environment: AWS_* and AWS_ENDPOINT_URL (MinIO, Ceph, R2), GCS application
                 credentials
"""

from __future__ import annotations

import http.client
import io
import os
import queue
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://")
PERMANENT_HTTP = frozenset({400, 401, 403, 404, 405, 410})


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


class Unreachable(OSError):
    """A shard that cannot be read: the URL and why (a status, or the retries spent)."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"{url}: {why}")
        self.url, self.why = url, why


@dataclass(frozen=True)
class Retries:
    """How hard a read tries (the ALIGNVL_REMOTE_* environment variables override it, so that
    DataLoader workers and `data check` read it the same way)."""

    attempts: int = 6  # reopenings of one shard before it is unreachable
    backoff_s: float = 0.5  # the first wait; doubled each time, at most 30 s
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_environment(cls) -> Retries:
        env = os.environ
        return cls(int(env.get("ALIGNVL_REMOTE_ATTEMPTS", cls.attempts)),
                   float(env.get("ALIGNVL_REMOTE_BACKOFF_S", cls.backoff_s)),
                   float(env.get("ALIGNVL_REMOTE_CONNECT_TIMEOUT_S", cls.connect_timeout_s)),
                   float(env.get("ALIGNVL_REMOTE_READ_TIMEOUT_S", cls.read_timeout_s)))


class _Transient(Exception):
    """A break worth reopening at the byte reached."""


def _opener(read_timeout_s: float) -> urllib.request.OpenerDirector:
    """urllib with two timeouts: the one given to `open` while connecting (and the TLS
    handshake), `read_timeout_s` for every read after it (urllib alone has one for both)."""

    def timed(connection_class):
        class Timed(connection_class):
            def connect(self) -> None:
                super().connect()
                self.sock.settimeout(read_timeout_s)
        return Timed

    http_connection, https_connection = timed(http.client.HTTPConnection), timed(http.client.HTTPSConnection)
    context = ssl.create_default_context()

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req, context=context)

    return urllib.request.build_opener(HTTP, HTTPS)


def _open_http(url: str, offset: int, retries: Retries, end: int | None = None) -> tuple[io.RawIOBase, int | None]:
    """The body from `offset` on (to byte `end`, excluded, where given), and the whole object's
    size where the server says it."""
    ranged = f"bytes={offset}-{end - 1 if end is not None else ''}"
    request = urllib.request.Request(url, headers={"Range": ranged} if offset or end is not None else {})
    try:
        response = _opener(retries.read_timeout_s).open(request, timeout=retries.connect_timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # asked past the end: nothing left
            return io.BytesIO(b""), offset
        if exc.code in PERMANENT_HTTP:
            raise Unreachable(url, f"HTTP {exc.code} {exc.reason}") from None
        raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out while connecting
        raise _Transient(str(getattr(exc, "reason", exc))) from None
    length = response.headers.get("Content-Length")
    if offset and response.status == 200:  # the server ignored the range: skip to the byte reached
        _skip(response, offset)
    total = int(response.headers["Content-Range"].rsplit("/", 1)[1]) if response.status == 206 and \
        "/" in response.headers.get("Content-Range", "") else (int(length) if length is not None else None)
    return response, total


def _skip(stream, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise _Transient("the body ended while skipping to the byte reached")
        n -= len(chunk)


def _open_fsspec(url: str, offset: int, retries: Retries, end: int | None = None) -> tuple[io.RawIOBase, int | None]:
    try:
        import fsspec
    except ImportError:
        raise Unreachable(url, "reading s3:// and gs:// needs fsspec with s3fs or gcsfs: pip install "
                               "'alignvl-scale[cloud]'") from None
    try:
        # s3fs takes botocore's two timeouts; gcsfs keeps its own (aiohttp's).
        options = {"config_kwargs": {"connect_timeout": retries.connect_timeout_s,
                                     "read_timeout": retries.read_timeout_s}} if url.startswith("s3://") else {}
        fs, path = fsspec.core.url_to_fs(url, **options)
        size = fs.size(path)
        stream = fs.open(path, "rb", block_size=8 << 20)
        stream.seek(offset)
        return stream, size
    except FileNotFoundError:
        raise Unreachable(url, "no such object") from None
    except PermissionError as exc:
        raise Unreachable(url, f"access denied ({exc})") from None
    except ImportError as exc:
        raise Unreachable(url, f"{exc}: pip install 'alignvl-scale[cloud]'") from None
    except OSError as exc:
        raise _Transient(str(exc)) from None


def reader_modules(urls: list[str]) -> list[str]:
    """The modules that read these URLs (s3fs for s3://, gcsfs for gs://): imported once in
    the DataLoader's fork server rather than in each worker of each epoch."""
    schemes = {url.split("://", 1)[0] for url in urls if is_remote(url)}
    return [module for scheme, module in (("s3", "s3fs"), ("gs", "gcsfs")) if scheme in schemes]


class ResumingReader(io.RawIOBase):
    """A remote object as a stream that reopens at the byte it reached when a transfer breaks
    (see the module docstring); `Unreachable` once that is not possible."""

    def __init__(self, url: str, retries: Retries | None = None,
                 sleep: Callable[[float], None] = time.sleep, start: int = 0, end: int | None = None) -> None:
        """start, end: the bytes to read (a Range request; end excluded, None: to the end)."""
        super().__init__()
        self.url, self.retries, self.sleep = url, retries or Retries.from_environment(), sleep
        self.offset, self.total, self.reopened, self.end = start, None, 0, end
        self._opener = _open_http if url.startswith(("http://", "https://")) else _open_fsspec
        self._stream = self._open()

    def _open(self):
        failures = 0
        while True:
            try:
                stream, total = self._opener(self.url, self.offset, self.retries, self.end)
                self.total = self.end if self.end is not None else total if total is not None else self.total
                return stream
            except _Transient as exc:
                failures += 1
                self._wait(failures, exc)

    def _wait(self, failures: int, exc: Exception) -> None:
        if failures + self.reopened > self.retries.attempts:
            raise Unreachable(self.url, f"{exc} (gave up after {self.retries.attempts} retries)")
        self.sleep(min(30.0, self.retries.backoff_s * 2 ** (failures - 1)))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0
        if self.end is not None:  # no byte past the range (an object store's stream would go on)
            buffer = memoryview(buffer)[:max(0, self.end - self.offset)]
            if not len(buffer):
                return 0
        while True:
            try:
                n = self._stream.readinto(buffer)
                if n == 0 and len(buffer) and self.total is not None and self.offset < self.total:
                    raise _Transient(f"the body ended at byte {self.offset} of {self.total}")
                self.offset += n
                return n
            except (_Transient, OSError, ValueError) as exc:  # ValueError: a read on a connection closed under it
                if isinstance(exc, Unreachable):
                    raise
                failures += 1
                self._wait(failures, exc)
                self.reopened += 1
                self._close_stream()
                self._stream = self._open()

    def _close_stream(self) -> None:
        try:
            self._stream.close()
        except Exception:  # a broken connection may not close cleanly; it is dropped either way
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_stream()
        super().close()


class ReadAhead(io.RawIOBase):
    """A `ResumingReader` drained by a thread up to `limit` bytes ahead of its consumer, so that
    the network works while the consumer decodes. The thread's failure (`Unreachable`) is
    raised to the consumer where the bytes before it run out."""

    CHUNK = 1 << 20

    def __init__(self, url: str, retries: Retries | None = None, limit: int | None = None, start: int = 0,
                 end: int | None = None) -> None:
        super().__init__()
        self.url, self.start, self.end = url, start, end
        limit = limit or int(float(os.environ.get("ALIGNVL_REMOTE_READAHEAD_MB", 32)) * (1 << 20))
        self._chunks: queue.Queue = queue.Queue(maxsize=max(1, limit // self.CHUNK))
        self._stop = threading.Event()
        self._pending = b""
        self._thread = threading.Thread(target=self._fill, args=(retries,), daemon=True, name=f"read {url}")
        self._thread.start()

    def _fill(self, retries: Retries | None) -> None:
        item: bytes | BaseException
        try:
            with ResumingReader(self.url, retries, start=self.start, end=self.end) as source:
                while not self._stop.is_set():
                    item = source.read(self.CHUNK)
                    self._put(item)
                    if not item:
                        return
        except BaseException as exc:  # handed to the consumer, raised where it reads
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.5)  # the timeout only lets a closed reader end the thread
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending:
            item = self._chunks.get()  # the thread always answers: every read below it has timeouts
            if isinstance(item, BaseException):
                self._chunks.put(item)  # a later read raises again
                raise item
            if not item:
                self._chunks.put(item)
                return 0
            self._pending = item
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


# The byte ranges of shards a DataLoader worker reads next, already being fetched: (url, start, end).
_prefetched: dict[tuple[str, int, int | None], ReadAhead] = {}


def prefetch(url: str, start: int = 0, end: int | None = None, keep: int = 2) -> None:
    """Start fetching bytes start..end - 1 of a remote shard that `open_remote` will be asked
    for soon (a local one is left alone). `keep` are kept (a worker's streams' next pieces);
    an older one that was never opened is dropped."""
    key = (url, start, end)
    if not is_remote(url) or key in _prefetched:
        return
    while len(_prefetched) >= keep:
        _prefetched.pop(next(iter(_prefetched))).close()
    _prefetched[key] = ReadAhead(url, start=start, end=end)


def open_remote(url: str, retries: Retries | None = None, start: int = 0, end: int | None = None
                ) -> io.BufferedReader:
    """A remote object's bytes start..end - 1 (end None: to its end) as a buffered stream,
    fetched ahead by a thread (already started for a range given to `prefetch`)."""
    stream = _prefetched.pop((url, start, end), None) or ReadAhead(url, retries, start=start, end=end)
    return io.BufferedReader(stream, buffer_size=1 << 20)


def read_remote(url: str, retries: Retries | None = None) -> bytes:
    """A small object whole (a manifest, img2dataset's *_stats.json)."""
    with open_remote(url, retries) as stream:
        return stream.read()


def write_remote(url: str, text: str) -> None:
    """An object store's object written whole (s3://, gs://: one upload, which the store makes
    visible at once or not at all). HTTP servers are read-only here."""
    if not url.startswith(("s3://", "gs://")):
        raise Unreachable(url, "only s3:// and gs:// can be written to (shards index --out FOLDER writes the "
                               "manifest locally, to copy there)")
    import fsspec

    with fsspec.open(url, "w") as f:
        f.write(text)


def list_objects(folder: str, suffix: str) -> list[str]:
    """The objects of an s3:// or gs:// folder whose names end in `suffix`, sorted (HTTP has
    no listing: give the shards as a brace list there)."""
    if not folder.startswith(("s3://", "gs://")):
        raise Unreachable(folder, "an HTTP folder cannot be listed; name its shards as a brace list "
                                  "(http://host/shards/{00000..00099}.tar)")
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    scheme = folder.split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in fs.ls(path, detail=False) if p.endswith(suffix))


def exists(url: str) -> bool:
    """Whether a remote object can be opened (one request; a missing object is False)."""
    try:
        ResumingReader(url, Retries(attempts=2)).close()
        return True
    except Unreachable:
        return False

"""The one network seam: HTTP GETs with ranges, timeouts, speed floors and bounded redirects.

``HttpFetcher`` is also python-tuf's ``FetcherInterface``, so metadata and images travel
through the same code. Every transport failure leaves here as ``tuf``'s ``DownloadError``
(``DownloadHTTPError`` for a status code, ``SlowRetrievalError`` for a server that is too
slow), and every message starts with the URL it is about; callers re-root them as
:class:`~metadata.errors.TransportError`. Nothing here judges the bytes: verification
happens after, on what was read. The rules this module keeps (docs/transport.md):

- Bodies are never decoded: ``Accept-Encoding: identity`` is asked for, reads pass
  ``decode_content=False``, and a response that declares a ``Content-Encoding`` anyway is
  refused (a gzip bomb never expands; CVE-2025-66471).
- Redirects (301/302/303/307/308) are followed up to ``max_redirects`` hops, keeping the
  Range header; a loop, a non-http(s) target or one hop too many is an error naming the
  original and the last URL. TUF and the chunk table verify whatever the last hop sends.
- A read waits at most ``timeout`` for the next byte; a body slower than
  ``low_speed_limit`` bytes/s over the last ``low_speed_time`` seconds is given up
  (curl's ``--speed-limit``/``--speed-time``); ``deadline`` bounds a whole metadata or
  small-target request (TUF's slow-retrieval defence).
- A ranged read ends exactly where it was asked to: a body that stops short is an error
  (retried by the caller), and a read never takes more than the caller asked for, so a
  process killed between chunks has no read-ahead to lose.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

__all__ = ["HttpFetcher", "RangeStream", "RateLimiter", "SpeedFloor", "http_hint", "transport_hint", "MAX_REDIRECTS"]

_log = logging.getLogger(__name__)  # `abflip --verbose`: every request, its range and its answer
USER_AGENT = "abflip/0.1"
READ_SIZE = 64 << 10
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def http_hint(status: int) -> str:
    """What to do about an HTTP error status (the hint of the TransportError it becomes)."""
    if status in (404, 410):
        return ("the server has no such file: the repository or its mirror is incomplete (a publish in progress, "
                "or files deleted too early), or repository.url points to the wrong place (abflip reads its "
                "metadata/ and targets/)")
    if status in (401, 403):
        return "the server refused access: check the repository URLs and the server's or bucket's access rules"
    if status == 429:
        return "the server asks to slow down (rate limited); a later run retries and resumes"
    if status >= 500:
        return "the server failed; retry later (a later run resumes)"
    return "the server refused the request; check the repository URLs"


SLOW_HINT = ("the server or the link is too slow or stalled; retry later (a later run resumes), or adjust "
             "network.timeout / deadline / low_speed_limit / low_speed_time")


def transport_hint(e: tuf_exc.DownloadError) -> str | None:
    """The hint for the TransportError a download error becomes (None: the default hint)."""
    if isinstance(e, tuf_exc.DownloadHTTPError):
        return http_hint(e.status_code)
    if isinstance(e, tuf_exc.SlowRetrievalError):
        return SLOW_HINT
    return None


class RateLimiter:
    """A token bucket over bytes: ``consume(n)`` sleeps until ``n`` more bytes fit the rate.

    The bucket holds at most ``burst`` bytes (one second's worth by default), so an idle
    pause does not buy a burst above the limit. ``clock``/``sleep`` are injectable for tests.
    """

    def __init__(self, rate: int, *, burst: int | None = None, clock=time.monotonic, sleep=time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, READ_SIZE)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._last = clock()

    def consume(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)
            self._last = self._clock()
            self._tokens = 0.0


class SpeedFloor:
    """curl's ``--speed-limit/--speed-time`` for one response: ``arrived(n)`` raises
    ``SlowRetrievalError`` once fewer than ``limit * period`` bytes arrived in the last
    ``period`` seconds. Bytes are counted in one-second buckets (at most ``period + 1`` kept)."""

    def __init__(self, url: str, limit: int, period: float, clock=time.monotonic) -> None:
        self.url, self.limit, self.period, self._clock = url, limit, period, clock
        self._started = clock()
        self._buckets: collections.deque[list] = collections.deque()  # [second, bytes]
        self._sum = 0

    def arrived(self, n: int) -> None:
        now = self._clock()
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, n])
        self._sum += n
        while self._buckets and self._buckets[0][0] <= now - self.period - 1:
            self._sum -= self._buckets.popleft()[1]
        if now - self._started >= self.period:
            # the oldest bucket may straddle the window's start: counting it whole errs towards going on
            if self._sum < self.limit * self.period:
                raise tuf_exc.SlowRetrievalError(
                    f"{self.url}: fewer than {self.limit} bytes/s arrived over the last {self.period:g} s "
                    f"({self._sum} bytes; network.low_speed_limit / low_speed_time)")


class RangeStream:
    """An open GET. ``skip`` bytes must be dropped first (the server ignored Range); when
    ``length`` is known, the body must deliver exactly that many bytes after the skip.

    Iterate it for pieces of up to 64 KiB, or call :meth:`read` for at most ``n`` bytes
    (the image stream reads exactly what the chunk in hand still needs)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, skip: int, deadline: float | None,
                 limiter: RateLimiter | None = None, *, url: str = "", length: int | None = None,
                 floor: SpeedFloor | None = None, timeout: float | None = None) -> None:
        self._response = response
        self._timeout = timeout
        self.skip = skip
        self._deadline = deadline
        self._limiter = limiter
        self._floor = floor
        self.url = url
        self.length = length
        self.delivered = 0
        self._done = False
        self._read_size = READ_SIZE if limiter is None else max(4096, min(READ_SIZE, limiter.rate // 8))

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of what has arrived (waiting for at least one); ``b""`` at the end."""
        if self._done or n <= 0:
            return b""
        try:
            while True:
                want = min(self.skip, READ_SIZE) if self.skip else min(n, self._read_size)
                if self.length is not None and not self.skip:
                    want = min(want, self.length - self.delivered)
                    if want <= 0:
                        return self._end()
                # read1 returns what has arrived, without waiting for a full piece: a server
                # trickling bytes cannot hold one read past the deadline or the speed floor.
                data = self._response.read1(want, decode_content=False)
                if not data:
                    return self._end()
                if self._limiter is not None:
                    self._limiter.consume(len(data))
                if self._floor is not None:
                    self._floor.arrived(len(data))
                if self._deadline is not None and time.monotonic() > self._deadline:
                    raise tuf_exc.SlowRetrievalError(f"{self.url}: the download exceeded its deadline "
                                                     "(network.deadline)")
                if self.skip:
                    drop = min(self.skip, len(data))
                    self.skip -= drop
                    data = data[drop:]
                    if not data:
                        continue
                self.delivered += len(data)
                return data
        except tuf_exc.DownloadError:
            self.close()
            raise
        except urllib3.exceptions.ReadTimeoutError as e:
            self.close()
            gap = f"{self._timeout:g} s" if self._timeout is not None else "the read timeout"
            raise tuf_exc.SlowRetrievalError(f"{self.url}: no data arrived for {gap} (network.timeout)") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            self.close()
            raise tuf_exc.DownloadError(f"{self.url}: the connection failed during the download: "
                                        f"{_cause(e)}") from e

    def _end(self) -> bytes:
        self._done = True
        if self.length is not None and self.delivered < self.length:
            self.close()
            raise tuf_exc.DownloadError(f"{self.url}: the body ended after {self.delivered} of the "
                                        f"{self.length} bytes asked for")
        self._response.release_conn()
        return b""

    def __iter__(self) -> Iterator[bytes]:
        try:
            while data := self.read(READ_SIZE):
                yield data
        finally:
            if not self._done:
                self.close()

    def close(self) -> None:
        """Drop the connection (its unread body must not be handed to the next request)."""
        self._done = True
        self._response.close()
        self._response.release_conn()


def _cause(e: BaseException) -> str:
    """The root cause in words: 'connection refused', 'connection reset by peer', ..."""
    if type(e).__name__ == "IncompleteRead":  # http.client's and urllib3's
        return f"the connection closed early ({str(e).strip('()').removeprefix('IncompleteRead(')})"
    seen = e
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = str(e)
    for a in getattr(e, "args", ())[1:]:
        if isinstance(a, BaseException):
            return _cause(a)
    return text


class HttpFetcher(FetcherInterface):
    def __init__(self, *, timeout: float = 30.0, deadline: float | None = None, rate_limit: int = 0,
                 low_speed_limit: int = 1024, low_speed_time: float = 60.0,
                 max_redirects: int = MAX_REDIRECTS) -> None:
        """``timeout``: connect and per-read gap; ``deadline``: whole-request limit for metadata and
        small targets (TUF's slow-retrieval defence; an image may rightly take hours on a slow
        link, so its ranged reads have the gap timeout and the speed floor instead);
        ``rate_limit``: bytes per second over all requests of this fetcher (0: unlimited);
        ``low_speed_limit`` (bytes/s, 0: off) over ``low_speed_time`` (s): the speed floor of
        every body (never above half the rate limit, which would trip it by itself);
        ``max_redirects``: hops followed per request."""
        self.timeout = timeout
        self.deadline = deadline
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        if rate_limit and low_speed_limit:
            low_speed_limit = max(1, min(low_speed_limit, rate_limit // 2))
        self.low_speed_limit = low_speed_limit
        self.low_speed_time = low_speed_time
        self.max_redirects = max_redirects
        self._pool = urllib3.PoolManager(
            num_pools=4, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )

    def _get(self, url: str, headers: dict[str, str] | None) -> urllib3.BaseHTTPResponse:
        _log.debug("GET %s%s", url, f" ({headers['Range']})" if headers and "Range" in headers else "")
        try:
            r = self._pool.request("GET", url, headers=headers, preload_content=False, redirect=False,
                                   decode_content=False)
            _log.debug("%s: HTTP %s, %s bytes", url, r.status, r.headers.get("Content-Length", "?"))
            return r
        except urllib3.exceptions.NewConnectionError as e:  # before ConnectTimeoutError: it subclasses it
            raise tuf_exc.DownloadError(f"{url}: cannot connect: {_cause(e)}") from e
        except urllib3.exceptions.ConnectTimeoutError as e:
            raise tuf_exc.DownloadError(f"{url}: cannot connect: no answer within {self.timeout:g} s "
                                        "(network.timeout)") from e
        except urllib3.exceptions.ReadTimeoutError as e:
            raise tuf_exc.SlowRetrievalError(f"{url}: no response within {self.timeout:g} s "
                                             "(network.timeout)") from e
        except urllib3.exceptions.LocationValueError as e:
            raise tuf_exc.DownloadError(f"{url}: not a usable URL: {e}") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"{url}: the request failed: {_cause(e)}") from e
        except OSError as e:  # a socket error urllib3 did not wrap
            raise tuf_exc.DownloadError(f"{url}: the request failed: {_cause(e)}") from e

    def _request(self, url: str, headers: dict[str, str] | None = None) -> tuple[urllib3.BaseHTTPResponse, str]:
        """GET ``url``, following redirects; the response and the URL that answered."""
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise tuf_exc.DownloadError(f"{url}: not an http(s) URL")
        chain = [url]
        while True:
            current = chain[-1]
            where = current if current == url else f"{url} (redirected to {current})"
            r = self._get(current, headers)
            if r.status in _REDIRECTS:
                location = r.headers.get("Location")
                r.close()
                r.release_conn()
                if not location:
                    raise tuf_exc.DownloadError(f"{where}: HTTP {r.status} redirect without a Location")
                target = urljoin(current, location.strip())
                if urlsplit(target).scheme.lower() not in ("http", "https"):
                    raise tuf_exc.DownloadError(f"{where}: redirected to {target!r}, which is not an http(s) URL")
                if target in chain:
                    raise tuf_exc.DownloadError(f"{url}: redirect loop ({' -> '.join(chain + [target])})")
                if len(chain) > self.max_redirects:
                    raise tuf_exc.DownloadError(f"{url}: more than {self.max_redirects} redirects "
                                                f"(the last to {target})")
                chain.append(target)
                continue
            if r.status >= 400:
                r.close()
                r.release_conn()
                raise tuf_exc.DownloadHTTPError(f"{where}: HTTP {r.status} {r.reason or ''}".rstrip(), r.status)
            encoding = r.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                r.close()
                r.release_conn()
                raise tuf_exc.DownloadError(f"{where}: the server sent Content-Encoding: {encoding} although "
                                            "asked for identity (abflip never decodes bodies)")
            return r, where

    def _floor(self, where: str) -> SpeedFloor | None:
        if not self.low_speed_limit or not self.low_speed_time:
            return None
        return SpeedFloor(where, self.low_speed_limit, self.low_speed_time)

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = None if self.deadline is None else time.monotonic() + self.deadline
        r, where = self._request(url)
        return iter(RangeStream(r, 0, deadline, self.limiter, url=where, floor=self._floor(where), timeout=self.timeout))

    def open_range(self, url: str, start: int, end: int) -> RangeStream:
        """GET ``[start, end)``; works whether or not the server honours Range. The stream
        delivers exactly ``end - start`` bytes or raises ``DownloadError``."""
        headers = {"Range": f"bytes={start}-{end - 1}"} if start or end else None
        r, where = self._request(url, headers)
        floor = self._floor(where)
        if r.status == 206:
            got = r.headers.get("Content-Range", "")
            m = _CONTENT_RANGE.match(got.strip())
            if not m or int(m[1]) != start or int(m[2]) < start or (end and int(m[2]) > end - 1):
                r.close()
                r.release_conn()
                raise tuf_exc.DownloadError(f"{where}: the server answered range {got!r} "
                                            f"for bytes={start}-{end - 1}")
            size = None if m[3] == "*" else int(m[3])
            return RangeStream(r, 0, None, self.limiter, url=where, length=_expect(start, end, size), floor=floor,
                           timeout=self.timeout)
        if r.status != 200:
            r.close()
            r.release_conn()
            raise tuf_exc.DownloadError(f"{where}: HTTP {r.status} is not an answer to a GET of bytes {start}-{end - 1}")
        # 200: the whole object; drop what we have
        size = r.length_remaining
        return RangeStream(r, start, None, self.limiter, url=where, length=_expect(start, end, size), floor=floor,
                           timeout=self.timeout)


def _expect(start: int, end: int, size: int | None) -> int:
    """How many bytes from ``start`` the body must deliver. An object the server itself says
    is shorter than ``end`` delivers what it has and ends cleanly: the caller, who knows the
    signed length, blames the repository; a body ending before what its headers promised is a
    transport failure (``DownloadError``), retried."""
    if size is not None and size < end:
        return max(0, size - start)
    return end - start

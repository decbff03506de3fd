"""The one network seam: HTTP GETs with ranges, timeouts and bounded sizes.

``HttpFetcher`` is also python-tuf's ``FetcherInterface``, so metadata and images travel
through the same code. Every transport failure leaves here as ``tuf``'s ``DownloadError``
(``DownloadHTTPError`` for a status code); callers re-root them as
:class:`~metadata.errors.TransportError`. Nothing here judges the bytes: verification
happens after, on what was read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

__all__ = ["HttpFetcher", "RangeStream", "RateLimiter"]

USER_AGENT = "abflip/0.1"
READ_SIZE = 64 << 10


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


def _arrived(response: urllib3.BaseHTTPResponse, size: int) -> Iterator[bytes]:
    """What has arrived, up to ``size`` per piece (``read1``, unlike ``stream``, does not wait
    for a full piece): a server trickling bytes cannot hold one read past the deadline."""
    while data := response.read1(size):
        yield data


class RangeStream:
    """An open GET from ``start``; ``skip`` bytes must be dropped first (server ignored Range)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, skip: int, deadline: float | None,
                 limiter: RateLimiter | None = None) -> None:
        self._response = response
        self.skip = skip
        self._deadline = deadline
        self._limiter = limiter

    def __iter__(self) -> Iterator[bytes]:
        read_size = READ_SIZE if self._limiter is None else max(4096, min(READ_SIZE, self._limiter.rate // 8))
        try:
            for data in _arrived(self._response, read_size):
                if self._limiter is not None:
                    self._limiter.consume(len(data))
                if self._deadline is not None and time.monotonic() > self._deadline:
                    raise tuf_exc.SlowRetrievalError("download exceeded its deadline")
                if self.skip:
                    drop = min(self.skip, len(data))
                    self.skip -= drop
                    data = data[drop:]
                    if not data:
                        continue
                yield data
        except tuf_exc.DownloadError:
            raise
        except urllib3.exceptions.ReadTimeoutError as e:
            raise tuf_exc.SlowRetrievalError(str(e)) from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"connection failed during download: {e}") from e
        finally:
            self._response.release_conn()

    def close(self) -> None:
        self._response.release_conn()


class HttpFetcher(FetcherInterface):
    def __init__(self, *, timeout: float = 30.0, deadline: float | None = None, rate_limit: int = 0) -> None:
        """``timeout``: connect and per-read gap; ``deadline``: whole-request limit for metadata and
        small targets (TUF's slow-retrieval defence; the image's ranged reads have only the gap
        timeout, since a large image may rightly take hours on a slow link);
        ``rate_limit``: bytes per second over all requests of this fetcher (0: unlimited)."""
        self.timeout = timeout
        self.deadline = deadline
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self._pool = urllib3.PoolManager(
            num_pools=4, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )

    def _request(self, url: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        try:
            r = self._pool.request("GET", url, headers=headers, preload_content=False, redirect=True)
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exc.SlowRetrievalError(f"{url}: {e}") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"{url}: {e}") from e
        if r.status >= 400:
            r.release_conn()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {r.status}", r.status)
        return r

    def _deadline(self) -> float | None:
        return None if self.deadline is None else time.monotonic() + self.deadline

    def _fetch(self, url: str) -> Iterator[bytes]:
        return iter(RangeStream(self._request(url), 0, self._deadline(), self.limiter))

    def open_range(self, url: str, start: int, end: int) -> RangeStream:
        """GET ``[start, end)``; works whether or not the server honours Range."""
        headers = {"Range": f"bytes={start}-{end - 1}"} if start or end else None
        r = self._request(url, headers)
        if r.status == 206:
            got = r.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {start}-"):
                r.release_conn()
                raise tuf_exc.DownloadError(f"{url}: server answered range {got!r} for bytes={start}-{end - 1}")
            return RangeStream(r, 0, None, self.limiter)
        return RangeStream(r, start, None, self.limiter)  # 200: the whole object; drop what we have

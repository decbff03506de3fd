"""zstd for the chained frames of a release: the device's decoder and the producer's compressor.

Both sides chain a release's frames: chunk ``i`` may match the ``window`` image bytes before
it, a raw *prefix* to zstd (``ZSTD_DCtx_refPrefix``), which is a raw-content dictionary to the
format. Two libraries, each where it is best (issue 25, measured in docs/producer.md and
docs/device.md):

- **The device decodes through the system's libzstd (ctypes, :class:`Decoder`)**: straight into
  the caller's buffer (``ZSTD_d_stableOutBuffer``, so no window buffer of its own and nothing
  copied out of one), the prefix referenced where it lies (the previous chunk's buffer, or the
  slot's page cache: file-backed, reclaimable memory). No Python binding offers both:
  ``compression.zstd``/``backports.zstd`` copy the prefix (``ZstdDict``) and return new bytes
  from the decoder's own window, python-zstandard copies its dictionary too. Measured on a 1 GiB
  image, 32 MiB chunks, one core (issue 14): 16 MiB window 1.40 s -> 0.74 s of decompression;
  128 MiB window 3.26 s -> 0.68 s. The library is the system's (Debian's ``libzstd1``, which
  dpkg itself depends on), else the one ``backports.zstd`` bundles (its extension module exports
  libzstd's functions: the same ctypes binding over it). :data:`LIB` is None without either
  (>= 1.5); the device then decodes with python-zstandard, and the bytes written are the same
  every way (tests run them).
- **The producer compresses through** ``compression.zstd`` (Python 3.14) or its backport
  ``backports.zstd`` (:func:`compress`), which bundles a libzstd newer than Debian 12's 1.5.4:
  1.5.4 indexes a whole prefix in its regular match finder, so a 128 MiB window cost more than
  twice the CPU per chunk.

Every ctypes call releases the GIL.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["LIB", "load", "ZstdLibError", "Decoder", "compress", "compressor_version", "address"]

# zstd.h (stable since 1.4.0 unless marked experimental; the numbers are its ABI)
D_WINDOW_LOG_MAX = 100
D_STABLE_OUT_BUFFER = 1001  # ZSTD_d_experimentalParam2, since 1.4.4
RESET_SESSION = 1
MIN_VERSION = 10500
PYBUF_WRITABLE, PYBUF_ND = 0x1, 0x8  # Python's buffer protocol: writable; contiguous, with a shape


class ZstdLibError(Exception):
    """libzstd refused: the message is its error name."""


class _Buffer(ctypes.Structure):  # ZSTD_inBuffer and ZSTD_outBuffer
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):  # Py_buffer (stable ABI since 3.11)
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _candidates(how: str):
    """Where a libzstd may be, best first: the system's (by its Linux name, then as the platform
    finds it: ``ldconfig -p``, ~15 ms), then the one ``backports.zstd`` bundles, whose extension
    module exports libzstd's functions (found on ``sys.path`` without importing it). ``how``
    (``ABFLIP_ZSTD``): ``python`` uses none (the python-zstandard fallback, on purpose: tests, a
    suspect libzstd), ``bundled`` only the bundled one."""
    if how == "python":
        return
    if how != "bundled":
        yield "libzstd.so.1"
        from ctypes.util import find_library

        if name := find_library("zstd"):
            yield name
    import glob
    import sys

    for entry in sys.path:
        yield from sorted(glob.glob(os.path.join(entry or ".", "backports", "zstd", "_zstd*.so")))


def load(how: str = "") -> ctypes.CDLL | None:
    """The first usable libzstd of :func:`_candidates`, its decoder's functions typed; None if none."""
    vp, size, cint = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    for name in _candidates(how):
        try:
            lib = ctypes.CDLL(name)
            lib.ZSTD_versionNumber.restype = ctypes.c_uint
            if lib.ZSTD_versionNumber() < MIN_VERSION:
                continue
            for fn, res, args in (
                    ("ZSTD_createDCtx", vp, []), ("ZSTD_freeDCtx", size, [vp]),
                    ("ZSTD_DCtx_setParameter", size, [vp, cint, cint]), ("ZSTD_DCtx_reset", size, [vp, cint]),
                    ("ZSTD_DCtx_refPrefix", size, [vp, vp, size]),
                    ("ZSTD_decompressStream", size, [vp, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer)]),
                    ("ZSTD_isError", ctypes.c_uint, [size]), ("ZSTD_getErrorName", ctypes.c_char_p, [size])):
                f = getattr(lib, fn)  # a build without one of them is not used
                f.restype, f.argtypes = res, args
        except (OSError, AttributeError):
            continue
        return lib
    return None


LIB = load(os.environ.get("ABFLIP_ZSTD", ""))


def _check(code: int) -> int:
    if LIB.ZSTD_isError(code):
        raise ZstdLibError(LIB.ZSTD_getErrorName(code).decode())
    return code


class address:
    """The address of a contiguous buffer (bytes, bytearray, mmap, memoryview slices), held
    (exported) until :meth:`release`: a bytearray cannot be resized nor an mmap closed meanwhile.
    ``writable``: refuse a read-only one (the decoder writes into its output)."""

    __slots__ = ("_view", "ptr", "len")

    def __init__(self, obj, writable: bool = False) -> None:
        self._view = _PyBuffer()
        flags = PYBUF_ND | (PYBUF_WRITABLE if writable else 0)
        if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(obj), ctypes.byref(self._view), flags):
            raise BufferError("not a contiguous buffer" + (" that can be written" if writable else ""))
        self.ptr, self.len = self._view.buf or 0, self._view.len

    def release(self) -> None:
        if self._view.obj:
            ctypes.pythonapi.PyBuffer_Release(ctypes.byref(self._view))
            self._view.obj = None

    def __enter__(self) -> address:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Decoder:
    """One zstd frame at a time, decoded straight into ``out`` (which must not move or be
    written by anyone else until :meth:`end`), matching back into ``prefix`` where it lies.

    ``start(out, prefix)``, then ``feed(data)`` with the frame's bytes in order: each returns
    how many bytes of ``out`` are final so far; :meth:`done` says whether the frame ended.
    Bytes past the frame's end are refused (:meth:`feed` raises), as is output beyond ``out``."""

    def __init__(self, window_log_max: int) -> None:
        self.ctx = LIB.ZSTD_createDCtx()
        if not self.ctx:
            raise MemoryError("ZSTD_createDCtx")
        _check(LIB.ZSTD_DCtx_setParameter(self.ctx, D_WINDOW_LOG_MAX, window_log_max))
        _check(LIB.ZSTD_DCtx_setParameter(self.ctx, D_STABLE_OUT_BUFFER, 1))
        self._out = self._prefix = None
        self._ob = _Buffer()
        self._left = 1  # zstd's hint: bytes still expected; 0 once the frame is complete

    def start(self, out, prefix=None) -> None:
        self.end()
        _check(LIB.ZSTD_DCtx_reset(self.ctx, RESET_SESSION))
        self._out = address(out, writable=True)
        self._ob = _Buffer(self._out.ptr, self._out.len, 0)
        if prefix is not None and len(prefix):
            self._prefix = address(prefix)
            _check(LIB.ZSTD_DCtx_refPrefix(self.ctx, self._prefix.ptr, self._prefix.len))
        self._left = 1

    def feed(self, data) -> int:
        with address(data) as a:
            ib = _Buffer(a.ptr, a.len, 0)
            while ib.pos < ib.size:
                if not self._left:
                    raise ZstdLibError(f"{ib.size - ib.pos} bytes after the end of the frame")
                before = (ib.pos, self._ob.pos)
                self._left = _check(LIB.ZSTD_decompressStream(self.ctx, ctypes.byref(self._ob), ctypes.byref(ib)))
                if (ib.pos, self._ob.pos) == before and self._left:
                    raise ZstdLibError("the frame decodes to more bytes than its output buffer holds")
        return self._ob.pos

    @property
    def produced(self) -> int:
        return self._ob.pos

    def done(self) -> bool:
        return not self._left

    def end(self) -> None:
        """Let go of the output buffer and the prefix (they may be reused or closed)."""
        for held in (self._out, self._prefix):
            if held is not None:
                held.release()
        self._out = self._prefix = None

    def close(self) -> None:
        self.end()
        if self.ctx:
            LIB.ZSTD_freeDCtx(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        if LIB is not None:
            self.close()


def compress(data, prefix=None, *, level: int, window_log: int, ldm: bool = False, ldm_rate_log: int = 0,
             checksum: bool = False) -> bytes:
    """One frame of ``data`` (its content size in the header), matching back into ``prefix``
    as if it came just before; with ``ldm``, long-distance matching searches the whole prefix
    (``ldm_rate_log``: it hashes one position in ``2**ldm_rate_log``; 0: zstd's default).

    The producer's compressor: Python's own ``compression.zstd`` (3.14), else its backport
    ``backports.zstd`` (a dependency: libzstd 1.5.7 or later, bundled). Not the system's
    libzstd: Debian 12's 1.5.4 indexes the *whole* prefix in its regular match finder, where
    1.5.5 and later load only what its tables hold (a 128 MiB window with 32 MiB chunks at level
    9: 5.3 s of CPU per 128 MiB of image with 1.5.4, 2.8 s with the bundled one; docs/producer.md).
    The prefix is copied once per frame (``ZstdDict``): the producer's memory, not the device's."""
    zstd = _compression()
    param = zstd.CompressionParameter
    options = {param.compression_level: level, param.window_log: window_log,
               param.enable_long_distance_matching: 1 if ldm else 0, param.content_size_flag: 1,
               param.checksum_flag: 1 if checksum else 0}
    if ldm and ldm_rate_log:
        options[param.ldm_hash_rate_log] = ldm_rate_log
    zdict = zstd.ZstdDict(prefix, is_raw=True).as_prefix if prefix is not None and len(prefix) else None
    cctx = zstd.ZstdCompressor(options=options, zstd_dict=zdict)
    cctx.set_pledged_input_size(len(data))  # nbytes: data may be a memoryview of any format
    return cctx.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)


def _compression():
    """``compression.zstd`` (Python 3.14), else ``backports.zstd``; imported on first use (the
    device's commands never compress, and never import it)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    return zstd


def compressor_version() -> str:
    """The libzstd the producer compresses with (the bundled one of :func:`compress`)."""
    return _compression().zstd_version

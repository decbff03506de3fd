"""zstd for the chained frames of a release, through one ctypes binding of libzstd: the device's
decoder and the producer's compressor.

Both sides chain a release's frames: chunk ``i`` may match the ``window`` image bytes before
it, a raw *prefix* to zstd (``ZSTD_DCtx_refPrefix``, ``ZSTD_CCtx_refPrefix``), which is a
raw-content dictionary to the format, referenced where it lies. No Python binding offers that
(issue 25, measured in ``bench/decode.py`` and ``bench/compress.py``; docs/producer.md and
docs/device.md): ``compression.zstd`` (Python 3.14) and its backport ``backports.zstd`` copy a
prefix into their ``ZstdDict`` (on the device 3.1x the anonymous memory and 1.9-2.3x the CPU of
this binding on the apply benchmark's release, on the producer 6-10 % more CPU and the window's copy
per worker) and return each piece of output as new bytes out of the decoder's own window buffer;
python-zstandard copies its dictionaries too, and its compressor never lets long-distance
matching see one.

- **The device decodes** (:class:`Decoder`) straight into the caller's buffer
  (``ZSTD_d_stableOutBuffer``: no window buffer of its own, nothing copied out of one), the prefix
  referenced in place (the previous chunk's buffer, or the slot's page cache: file-backed,
  reclaimable memory), with the system's libzstd (Debian's ``libzstd1``, which dpkg itself
  depends on), else the one ``backports.zstd`` bundles. Measured on a 1 GiB image, 32 MiB
  chunks, one core (issue 14): 16 MiB window 1.40 s -> 0.74 s of decompression; 128 MiB window
  3.26 s -> 0.68 s. :data:`LIB` is None without either (>= 1.5); the device then decodes with
  python-zstandard, and the bytes written are the same every way (tests run them).
- **The producer compresses** (:func:`compress`) with the libzstd ``backports.zstd`` bundles
  (1.5.7 or later), else the system's: Debian 12's 1.5.4 indexes a whole prefix in its regular
  match finder, so a 128 MiB window cost about twice the CPU per chunk (:func:`compressor`).

``backports.zstd``'s extension module exports libzstd's functions, so this binding loads it as
a library (found on ``sys.path``, never imported; a build that hid them would just not be used).
Every ctypes call releases the GIL.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["LIB", "load", "ZstdLibError", "Decoder", "compress", "compressor", "compressor_version", "with_compression",
           "address"]

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


def _check(code: int, lib: ctypes.CDLL | None = None) -> int:
    lib = lib or LIB
    if lib.ZSTD_isError(code):
        raise ZstdLibError(lib.ZSTD_getErrorName(code).decode())
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


# zstd.h's compression parameters (stable since 1.4.0; the numbers are its ABI)
C_LEVEL, C_WINDOW_LOG, C_LDM, C_LDM_RATE_LOG, C_CONTENT_SIZE, C_CHECKSUM = 100, 101, 160, 164, 200, 201
_COMPRESSOR: list = []  # the compressor's library, loaded on first use


def compressor() -> ctypes.CDLL:
    """The libzstd the producer compresses with: the one ``backports.zstd`` bundles (1.5.7 or
    later), else the system's. Not the system's first: Debian 12's 1.5.4 indexes a *whole* prefix
    in its regular match finder, where 1.5.5 and later load only what its tables hold (a 128 MiB
    window with 32 MiB chunks at level 9: 5.3 s of CPU per 128 MiB of image with 1.5.4, 2.8 s
    with the bundled one; docs/producer.md). Loaded on first use: the device never compresses."""
    if not _COMPRESSOR:
        lib = load("bundled") or load(os.environ.get("ABFLIP_ZSTD", ""))
        if lib is None:
            raise ZstdLibError("no libzstd to compress with: install backports.zstd (a dependency of abflip) "
                               "or the system's libzstd")
        _COMPRESSOR.append(with_compression(lib))
    return _COMPRESSOR[0]


def with_compression(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (from :func:`load`) with its compression functions typed too."""
    vp, size, cint = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    for fn, res, args in (("ZSTD_createCCtx", vp, []), ("ZSTD_freeCCtx", size, [vp]),
                          ("ZSTD_CCtx_setParameter", size, [vp, cint, cint]),
                          ("ZSTD_CCtx_refPrefix", size, [vp, vp, size]),
                          ("ZSTD_compress2", size, [vp, vp, size, vp, size]), ("ZSTD_compressBound", size, [size])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


def compressor_version() -> str:
    """The version of :func:`compressor`'s libzstd, e.g. ``1.5.7``."""
    v = compressor().ZSTD_versionNumber()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def compress(data, prefix=None, *, level: int, window_log: int, ldm: bool = False, ldm_rate_log: int = 0,
             checksum: bool = False, lib: ctypes.CDLL | None = None) -> bytearray:
    """One frame of ``data`` (its content size in the header), matching back into ``prefix``
    as if it came just before, referenced where it lies (nothing copied); with ``ldm``,
    long-distance matching searches the whole prefix (``ldm_rate_log``: it hashes one position
    in ``2**ldm_rate_log``; 0: zstd's default). ``lib``: another libzstd than :func:`compressor`'s
    (with its compression functions typed: the benchmark compares them)."""
    lib = lib or compressor()
    cctx = lib.ZSTD_createCCtx()
    if not cctx:
        raise MemoryError("ZSTD_createCCtx")
    try:
        for param, value in ((C_LEVEL, level), (C_WINDOW_LOG, window_log), (C_LDM, 1 if ldm else 0),
                             (C_LDM_RATE_LOG, ldm_rate_log if ldm else 0), (C_CONTENT_SIZE, 1),
                             (C_CHECKSUM, 1 if checksum else 0)):
            _check(lib.ZSTD_CCtx_setParameter(cctx, param, value), lib)
        with address(data) as src:
            out = bytearray(lib.ZSTD_compressBound(src.len))
            with address(out, writable=True) as dst:
                if prefix is not None and len(prefix):
                    with address(prefix) as pre:  # used by the next frame only, then forgotten
                        _check(lib.ZSTD_CCtx_refPrefix(cctx, pre.ptr, pre.len), lib)
                        n = _check(lib.ZSTD_compress2(cctx, dst.ptr, dst.len, src.ptr, src.len), lib)
                else:
                    n = _check(lib.ZSTD_compress2(cctx, dst.ptr, dst.len, src.ptr, src.len), lib)
        del out[n:]
        return out
    finally:
        lib.ZSTD_freeCCtx(cctx)

"""metadata/zstdlib.py, the system's libzstd through ctypes (issue 14): its frames and
python-zstandard's are the same format both ways (a prefix is a raw-content dictionary), and its
decoder refuses what does not fit. The image stream's own cases run with both decoders in
tests/test_pipeline.py."""

from __future__ import annotations

import os

import pytest
import zstandard

from metadata import zstdlib

pytestmark = pytest.mark.skipif(zstdlib.LIB is None, reason="no libzstd on this machine")


def _data() -> tuple[bytes, bytes]:
    prefix = os.urandom(1 << 20)
    return prefix, prefix[100_000:400_000] + os.urandom(50_000) + prefix[:200_000]


def _raw(prefix: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


@pytest.mark.parametrize("ldm", [False, True])
def test_a_prefix_is_a_raw_content_dictionary_both_ways(ldm):
    prefix, data = _data()
    frame = zstdlib.compress(data, prefix, level=9, window_log=21, ldm=ldm)
    assert len(frame) < 100_000  # it matched into the prefix
    assert zstandard.ZstdDecompressor(dict_data=_raw(prefix)).decompress(frame) == data
    theirs = zstandard.ZstdCompressor(level=9, write_content_size=True, dict_data=_raw(prefix)).compress(data)
    for f in (frame, theirs):
        out = bytearray(len(data))
        d = zstdlib.Decoder(27)
        d.start(out, memoryview(prefix))
        for k in range(0, len(f), 4096):  # fed as the pipeline does, in pieces
            d.feed(memoryview(f)[k:k + 4096])
        assert d.done() and d.produced == len(data) and out == data
        d.close()


def test_the_decoder_refuses_what_does_not_fit():
    prefix, data = _data()
    frame = zstdlib.compress(data, prefix, level=3, window_log=21)
    d = zstdlib.Decoder(27)
    with pytest.raises(BufferError):
        d.start(bytes(len(data)), prefix)  # read-only output
    d.start(bytearray(len(data) - 1), prefix)
    with pytest.raises(zstdlib.ZstdLibError, match="too small|more bytes than"):
        d.feed(frame)
    d.start(bytearray(len(data)), prefix[:-1])  # the wrong prefix: another content, caught by the checksum
    with pytest.raises(zstdlib.ZstdLibError):
        d.feed(zstdlib.compress(data, prefix, level=3, window_log=21, checksum=True))
    d.close()


def test_the_bundled_libzstd_is_there_for_both_sides():
    """backports.zstd's extension module exports libzstd's functions: the producer compresses with
    it (>= 1.5.5 loads only what its tables hold of a prefix), and a device without the system's
    libzstd decodes with it. A build that hid them would make both fall back: caught here."""
    bundled = zstdlib.load("bundled")
    assert bundled is not None and bundled.ZSTD_versionNumber() >= 10505
    assert zstdlib.compressor().ZSTD_versionNumber() == bundled.ZSTD_versionNumber()
    prefix, data = _data()
    frame = zstdlib.compress(data, prefix, level=9, window_log=27, ldm=True, ldm_rate_log=8, checksum=True)
    assert zstandard.ZstdDecompressor(dict_data=_raw(prefix)).decompress(frame) == data

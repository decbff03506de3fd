"""One bounded reader for every file abflip parses (issue 21; docs/threat-model.md "Hostile files").

Both halves read files someone else may have put there: a release directory, a configuration, the
device's state records, its id file, staged TUF metadata, a folder repository's metadata. Whatever
such a file is, reading and parsing it ends in a clear error, never a hang, a traceback or the
memory of the whole machine:

- :func:`read_file` reads a *regular file* only: it is opened ``O_NONBLOCK`` (a FIFO never blocks
  the open) and ``fstat``-ed before any read, so a FIFO, directory, device or socket is refused by
  its kind; its size is checked against the caller's limit *before* reading (a 3 GiB file costs
  nothing), and at most ``limit + 1`` bytes are read (one that grows meanwhile is refused too).
  Its refusal is a :class:`FileRefused`, an ``OSError`` whose ``strerror`` says what is wrong, so
  callers keep their ``except OSError`` and their own blame.
- :func:`loads_json` parses JSON nested at most :data:`MAX_JSON_DEPTH` deep, checked before the
  parser runs, so neither the parser nor anything that walks what it returned (a ``repr`` in an
  error message, canonical JSON for a signature) can exhaust the stack. :func:`json_depth_problem`
  is the same check for bytes handed to another parser (python-tuf's).
- :func:`loads_toml` (the device configuration) does the same for TOML: brackets nested at most
  :data:`MAX_TOML_DEPTH` deep and dotted keys of at most as many parts (``tomllib`` recurses on the
  first and is quadratic in memory on the second: a 200 KB ``a.a.a…= 1`` line exhausts the memory).

The checks are linear and run at C speed (regular expressions over the bytes; measured on an
8 MiB release manifest of 65,536 chunks: see tests/test_bounded.py). Pure but for :func:`read_file`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat

__all__ = ["FileRefused", "read_file", "open_regular", "loads_json", "json_depth_problem", "loads_toml", "toml_depth_problem",
           "MAX_JSON_DEPTH", "MAX_TOML_DEPTH", "TooDeep"]

# abflip's formats nest at most 6 deep (a release manifest's chunk pieces, TUF's succinct delegations).
MAX_JSON_DEPTH = 32
MAX_TOML_DEPTH = 16  # the configuration nests 3 deep ([slots] a = { device = … })


class FileRefused(OSError):
    """A file that is not what a reader accepts: not a regular file, or larger than its limit."""


class TooDeep(ValueError):
    """Text nested deeper than a parser is allowed to go."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _kind(st.st_mode)
            code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
            raise FileRefused(code, kind if kind.startswith("not") else f"is {kind}, not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_regular(path: str | os.PathLike):
    """A binary file object of the regular file ``path`` (to stream a file too large to hold);
    anything else is refused as :func:`read_file` refuses it, without blocking."""
    fd, _ = _open_regular(path)
    return os.fdopen(fd, "rb")


def read_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises :class:`FileRefused` (``strerror``: "is a FIFO, not a regular file", "is 3221225472
    bytes, more than the limit 65536") and the ``OSError`` of the open or read itself
    (``FileNotFoundError`` for a missing file)."""
    fd, st = _open_regular(path)
    try:
        if st.st_size > limit:
            raise FileRefused(errno.EFBIG, f"is {st.st_size} bytes, more than the limit {limit}", str(path))
        chunks, left = [], limit + 1
        while left > 0 and (piece := os.read(fd, min(left, 1 << 20))):
            chunks.append(piece)
            left -= len(piece)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise FileRefused(errno.EFBIG, f"grew past the limit of {limit} bytes while it was read", str(path))
    return data


# -- nesting ------------------------------------------------------------------------------------------
# A JSON string (the unrolled loop: linear, no backtracking); the brackets, one kind for both (the
# parsers refuse a '[' closed by a '}': here only the nesting counts).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{}")


def _depth_exceeds(skeleton: bytes, max_depth: int) -> bool:
    """Does ``skeleton`` (brackets only) nest deeper than ``max_depth``? Each pass removes the
    innermost pairs, so a tree of height h is gone after h passes."""
    skeleton = skeleton.translate(None, _NOT_STRUCTURE).translate(_BRACKETS)
    for _ in range(max_depth):
        if not skeleton:
            return False
        before, skeleton = len(skeleton), skeleton.replace(b"[]", b"")
        if len(skeleton) == before:
            break
    # What is left either still nests (too deep) or does not balance: the parser says what is wrong with
    # the latter, as long as its unclosed brackets cannot take it deeper than the limit either.
    return b"[]" in skeleton or skeleton.count(b"[") > max_depth


def json_depth_problem(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``data`` must not reach a JSON parser (nested deeper than ``max_depth``), or None."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if _depth_exceeds(_JSON_STRING.sub(b"", raw), max_depth):
        return f"it nests arrays or objects more than {max_depth} deep"
    return None


def loads_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> object:
    """``json.loads`` of text nested at most ``max_depth`` deep; raises ``ValueError``
    (:class:`TooDeep`, ``json.JSONDecodeError``, ``UnicodeDecodeError``) for anything else."""
    if (problem := json_depth_problem(data, max_depth)) is not None:
        raise TooDeep(problem)
    return json.loads(data)


# TOML: what cannot hold a bracket or a key (strings of the four kinds, comments), and what ends a key.
_TOML_SKIP = re.compile(r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"|\'[^\'\n]*\'|#[^\n]*',
                        re.DOTALL)
_TOML_NOT_KEY = re.compile(r"[=\[\]{},\n]")


def toml_depth_problem(text: str, max_depth: int = MAX_TOML_DEPTH) -> str | None:
    """Why ``text`` must not reach ``tomllib`` (arrays/tables nested, or keys dotted, more than
    ``max_depth`` deep), or None."""
    rest = _TOML_SKIP.sub('""', text)
    if max((part.count(".") for part in _TOML_NOT_KEY.split(rest)), default=0) >= max_depth:
        return f"it has a dotted key of more than {max_depth} parts"
    if _depth_exceeds(rest.encode("utf-8", "surrogatepass"), max_depth):
        return f"it nests arrays or tables more than {max_depth} deep"
    return None


def loads_toml(text: str, max_depth: int = MAX_TOML_DEPTH) -> dict:
    """``tomllib.loads`` of text within :func:`toml_depth_problem`'s bounds; raises
    :class:`TooDeep` or ``tomllib.TOMLDecodeError``."""
    import tomllib

    if (problem := toml_depth_problem(text, max_depth)) is not None:
        raise TooDeep(problem)
    return tomllib.loads(text)


"""Writing what the commands produce: one of each helper for the whole command family.

* ``sha256_file`` — the one file-hash helper (bundles, extractor provenance, exports).
* ``write_atomic`` — temp file in the same folder + fsync + rename, created with the
  user's umask (``mkstemp`` alone would make it 0600).
* ``write_json`` — every command's ``--json FILE|-`` output (``-`` = stdout).
* ``add_json_flag`` — the ``--json`` flag itself, the same metavar and help everywhere.
* exit codes shared by every command (``EXIT_*``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

# Exit codes of every edge-* command.
EXIT_OK = 0
EXIT_RUNTIME = 1  # a runtime failure (something broke while working)
EXIT_USAGE = 2  # usage error or bad input (the message names the file and the problem)
EXIT_FRAME_ERRORS = 3  # edge-run: the run finished, but some frame ended as ERROR
EXIT_INTERRUPTED = 130  # Ctrl-C, after the summary

_HASH_BLOCK = 1 << 20
JSON_METAVAR = "FILE|-"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename
    (never a half-written file under the final name), with permissions 0666 & ~umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(target: str | Path | None, obj, *, indent: int = 2) -> None:
    """``--json`` output: nothing when ``target`` is None, stdout for ``-``, else a file
    (parent folders created, written atomically)."""
    if target is None:
        return
    text = json.dumps(obj, indent=indent, default=str) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def add_json_flag(parser, what: str = "the result") -> None:
    """Add the family's ``--json FILE|-`` flag (optional everywhere)."""
    parser.add_argument("--json", metavar=JSON_METAVAR, default=None,
                        help=f"also write {what} as JSON to FILE, or to stdout with -")

"""The pipeline's wire format: one frame = one ZeroMQ multipart message.

``[msgpack header, array buffer 0, array buffer 1, ...]``

* The header is a msgpack map (msgpack >= 1.0 defaults: str is UTF-8, no bin in the
  header). It carries the schema version, the frame's identity (station, run id, frame
  id), per-stage entry/exit timestamps (``time.time_ns()`` integers), the status /
  decision / reason, and for each array its name, dtype and shape, in the order of the
  buffers that follow.
* Each array travels as its raw little-endian C-order bytes in its own message part, so
  the sender hands numpy's buffer to ZeroMQ (``copy=False``) and the receiver wraps the
  received buffer with ``np.frombuffer`` — no serialisation, no pickle. (pyzmq copies
  parts below 64 KiB anyway; the big ones, rgb and xyz, are the ones that pay.)
  Decoded arrays are read-only views of the message: copy before writing into them.
* ``decode`` trusts nothing: unknown schema, unknown or mistyped header keys, a dtype
  outside the allow-list, a shape that does not match the byte count, too many arrays,
  an oversize header or frame — each raises ``WireError`` naming the message and the
  problem.

The same format is the ingress format a camera driver pushes to ``edge-run --source
zmq+tcp://...`` (a subset of the header keys; see ``INGRESS_KEYS`` and docs/wire.md).
Control messages between the runner and its stages are plain msgpack maps
(``pack_msg`` / ``unpack_msg``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack
import numpy as np

from edge_runtime.errors import DataError

SCHEMA = 1
# Every dtype a stage may put on the wire (names as numpy spells them; bytes are little-endian).
ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64"}
)
MAX_HEADER_BYTES = 256 * 1024  # a header is a few hundred bytes; regions lists stay far below this
MAX_ARRAYS = 16
MAX_NDIM = 4
# Default cap on one frame's array bytes: a 2448 x 2048 structured-light camera (xyz float32 +
# rgb) is ~75 MB. ``edge-run --max-frame-mb`` changes it.
DEFAULT_MAX_FRAME_BYTES = 128 * 1024 * 1024

DECISIONS = ("OK", "NOT_OK", "NOT_DECIDABLE", "ERROR", "DROPPED")
KINDS = ("frame", "eos")


class WireError(DataError):
    """A message that is not a valid frame. ``path`` names the message (endpoint or frame id)."""


@dataclass
class Frame:
    """One frame in flight: the header map and its named arrays (``arrays`` keeps wire order)."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def frame_id(self) -> int | None:
        return self.header.get("frame_id")


# ---------------------------------------------------------------------------------------
# header schema


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass; a flag is not a frame id


def _is_num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str_max(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) <= n


def _stamps(v: Any) -> bool:
    """{stage: [entry_ns, exit_ns]} with non-negative integer nanoseconds."""
    return (
        isinstance(v, dict)
        and len(v) <= 16
        and all(
            isinstance(k, str)
            and isinstance(p, list)
            and len(p) == 2
            and all(_is_int(x) and x >= 0 for x in p)
            for k, p in v.items()
        )
    )


def _ms_map(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= 32 and all(isinstance(k, str) and _is_num(x) for k, x in v.items())


_REGION_KEYS = {"x": _is_int, "y": _is_int, "w": _is_int, "h": _is_int, "area": _is_int, "max_score": _is_num}


def _regions(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) <= 1024
        and all(
            isinstance(r, dict) and r.keys() == _REGION_KEYS.keys() and all(_REGION_KEYS[k](x) for k, x in r.items())
            for r in v
        )
    )


def _shape2(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)


def _geometry(v: Any) -> bool:
    """[canvas_h, canvas_w, top, left] (edge_runtime.geometry.MapGeometry on the wire)."""
    return (isinstance(v, list) and len(v) == 4 and all(_is_int(x) and 0 <= x <= 1 << 31 for x in v)
            and v[0] > 0 and v[1] > 0)


# key -> validator. Everything but "schema" and "arrays" is optional on the wire; stages
# fill the keys they own (see docs/wire.md for who writes what).
HEADER_KEYS: dict[str, Callable[[Any], bool]] = {
    "schema": _is_int,
    "kind": lambda v: v in KINDS,
    "station": _str_max(128),
    "run_id": _str_max(128),
    "frame_id": lambda v: _is_int(v) and v >= 0,
    "capture_ns": lambda v: _is_int(v) and v >= 0,
    "source": _opt(_str_max(1024)),
    "image_shape": _opt(_shape2),
    "geometry": _opt(_geometry),
    "category": _opt(_str_max(128)),
    "t": _stamps,
    "status": _opt(lambda v: v in DECISIONS),
    "reason": _opt(_str_max(2048)),
    "score": _opt(_is_num),
    "threshold": _opt(_is_num),
    "regions": _opt(_regions),
    "infer_ms": _opt(_ms_map),
    "worker": _opt(_str_max(64)),
    "captured": lambda v: _is_int(v) and v >= 0,
    "arrays": lambda v: isinstance(v, list),
}
# What a camera driver may send to the ingress socket (the runtime assigns the rest).
INGRESS_KEYS = frozenset({"schema", "kind", "source", "arrays"})


def _check_header(header: Any, where: str, allowed: Iterable[str]) -> None:
    if not isinstance(header, dict):
        raise WireError(where, f"header must be a msgpack map, got {type(header).__name__}")
    if "schema" not in header:
        raise WireError(where, "header has no 'schema' key")
    if header["schema"] != SCHEMA:
        raise WireError(where, f"unknown schema version {header['schema']!r}; this runtime speaks {SCHEMA}")
    allowed = set(allowed)
    for key, value in header.items():
        if key not in allowed:
            raise WireError(where, f"unknown header key {_short(key)} (allowed: {', '.join(sorted(allowed))})")
        if not HEADER_KEYS[key](value):
            raise WireError(where, f"header key {key!r} has an invalid value {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------
# encode / decode


def encode(frame: Frame) -> list:
    """Frame -> multipart ``[header bytes, buffer, ...]`` for ``send_multipart(copy=False)``.

    Arrays are sent as their own memory when already C-contiguous little-endian (no copy);
    otherwise a contiguous little-endian copy is made. The header's "arrays" entry is
    written here from ``frame.arrays``; ``schema`` is set to ``SCHEMA``.
    """
    meta, buffers = [], []
    for name, arr in frame.arrays.items():
        arr = np.asarray(arr)
        dtype = arr.dtype.name
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r}", f"dtype {dtype} is not allowed on the wire ({sorted(ALLOWED_DTYPES)})")
        arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)  # no copy when already so
        meta.append({"name": name, "dtype": dtype, "shape": list(arr.shape)})
        buffers.append(memoryview(arr).cast("B") if arr.ndim and arr.size else arr.tobytes())
    header = dict(frame.header, schema=SCHEMA, arrays=meta)
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def _nbytes(part: Any) -> memoryview:
    """The readable buffer of a received part (bytes, memoryview or zmq.Frame)."""
    buf = getattr(part, "buffer", part)  # zmq.Frame -> its memoryview
    return memoryview(buf).cast("B")


def decode(
    parts: list,
    where: str = "message",
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    allowed_keys: Iterable[str] = HEADER_KEYS,
) -> Frame:
    """Multipart message -> Frame, validating everything. Raises ``WireError(where, problem)``.

    ``parts``: the received parts (bytes, memoryview or zmq.Frame from ``copy=False``).
    ``max_bytes``: cap on the sum of array bytes (a frame above it is refused, not parsed).
    ``allowed_keys``: header keys accepted (``INGRESS_KEYS`` for camera input).
    Arrays are zero-copy read-only views of the received buffers.
    """
    if not parts:
        raise WireError(where, "empty message (no parts)")
    head = _nbytes(parts[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(where, f"header is {head.nbytes} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(
            head, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_HEADER_BYTES, max_bin_len=0, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, StackError...
        raise WireError(where, f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if isinstance(header, dict) and _is_int(header.get("frame_id")):
        where = f"{where} (frame {header['frame_id']})"
    _check_header(header, where, allowed_keys)
    meta = header.pop("arrays")
    if len(meta) > MAX_ARRAYS:
        raise WireError(where, f"{len(meta)} arrays, over the limit of {MAX_ARRAYS}")
    if len(meta) != len(parts) - 1:
        raise WireError(where, f"header lists {len(meta)} arrays but the message has {len(parts) - 1} buffer parts")
    total = sum(_nbytes(p).nbytes for p in parts[1:])
    if total > max_bytes:
        raise WireError(where, f"frame is {total} bytes of arrays, over the {max_bytes}-byte limit")
    arrays: dict[str, np.ndarray] = {}
    for i, (m, part) in enumerate(zip(meta, parts[1:])):
        name = _check_array_meta(m, i, where)
        if name in arrays:
            raise WireError(where, f"array name {name!r} appears twice")
        dtype = np.dtype(m["dtype"]).newbyteorder("<")
        shape = tuple(m["shape"])
        buf = _nbytes(part)
        expected = math.prod(shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise WireError(
                where,
                f"array {name!r}: {m['dtype']} {list(shape)} needs {expected} bytes, buffer has {buf.nbytes}",
            )
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        if not dtype.isnative:
            arr = arr.astype(dtype.newbyteorder("="))
        arr.flags.writeable = False
        arrays[name] = arr
    return Frame(header, arrays)


def _check_array_meta(m: Any, i: int, where: str) -> str:
    if not isinstance(m, dict) or set(m) != {"name", "dtype", "shape"}:
        raise WireError(where, f"array entry {i} must be a map with exactly name, dtype, shape; got {_short(m)}")
    name, dtype, shape = m["name"], m["dtype"], m["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise WireError(where, f"array entry {i}: name must be a 1-64 character string, got {_short(name)}")
    if dtype not in ALLOWED_DTYPES:
        raise WireError(where, f"array {name!r}: dtype {_short(dtype)} is not allowed "
                               f"({', '.join(sorted(ALLOWED_DTYPES))})")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(_is_int(s) and 0 <= s <= 1 << 31 for s in shape)
    ):
        raise WireError(where, f"array {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints, "
                               f"got {_short(shape)}")
    return name


def salvage_identity(parts: list) -> dict | None:
    """The frame identity (station, run_id, frame_id, capture_ns, source, category) of a
    message that ``decode`` refused, when its header still carries a valid one; else None.

    Lets a stage turn an internal frame that fails validation into one ERROR record
    instead of losing its id (docs/wire.md, "Flow control and loss accounting")."""
    try:
        header = msgpack.unpackb(_nbytes(parts[0]), raw=False, strict_map_key=True,
                                 max_str_len=MAX_HEADER_BYTES, max_bin_len=0, max_ext_len=0)
    except Exception:
        return None
    if not isinstance(header, dict):
        return None
    ident = {}
    for key in ("station", "run_id", "frame_id", "capture_ns"):
        if key not in header or not HEADER_KEYS[key](header[key]):
            return None
        ident[key] = header[key]
    for key in ("source", "category"):
        value = header.get(key)
        ident[key] = value if HEADER_KEYS[key](value) else None
    return ident


# ---------------------------------------------------------------------------------------
# control messages (runner <-> stages): small msgpack maps with a "kind"


def pack_msg(kind: str, **fields: Any) -> bytes:
    """A control message: msgpack map {"kind": kind, **fields}."""
    return msgpack.packb({"kind": kind, **fields}, use_bin_type=True)


def unpack_msg(data: Any, where: str = "control message") -> dict[str, Any]:
    """Inverse of ``pack_msg``; raises ``WireError`` unless it is a map with a string "kind"."""
    try:
        msg = msgpack.unpackb(_nbytes(data), raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:
        raise WireError(where, f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
        raise WireError(where, f"expected a map with a string 'kind', got {_short(msg)}")
    return msg

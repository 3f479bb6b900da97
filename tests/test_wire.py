"""Wire format: encode/decode round trips (zero-copy) and every malformed-message case."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from edge_runtime.errors import DataError
from edge_runtime.pipeline.wire import (
    INGRESS_KEYS,
    MAX_ARRAYS,
    MAX_HEADER_BYTES,
    SCHEMA,
    Frame,
    WireError,
    decode,
    encode,
    pack_msg,
    unpack_msg,
)


def _header(**extra):
    return {"kind": "frame", "station": "s1", "run_id": "r1", "frame_id": 7, "capture_ns": 123,
            "t": {"capture": [100, 200]}, "status": None, "reason": None, **extra}


def _parts(header: dict, *buffers: bytes) -> list:
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def test_round_trip_keeps_header_and_arrays_of_every_allowed_kind():
    rng = np.random.default_rng(0)
    arrays = {
        "rgb": rng.integers(0, 255, (5, 7, 3), dtype=np.uint8),
        "xyz": rng.normal(size=(5, 7, 3)).astype(np.float32),
        "mask": rng.random((5, 7)) > 0.5,
        "half": np.ones(4, np.float16),
        "empty": np.zeros((0, 3), np.float64),
        "scalar": np.array(3, np.int64),
    }
    header = _header(score=0.25, threshold=0.5, regions=[{"x": 1, "y": 2, "w": 3, "h": 4, "area": 12,
                                                          "max_score": 0.9}], source="cam/1")
    out = decode(encode(Frame(header, arrays)))
    assert out.header == {**header, "schema": SCHEMA}
    assert list(out.arrays) == list(arrays)
    for name, arr in arrays.items():
        assert out.arrays[name].dtype == arr.dtype and out.arrays[name].shape == arr.shape
        np.testing.assert_array_equal(out.arrays[name], arr)


def test_encode_sends_contiguous_arrays_without_copy_and_fixes_layout_otherwise():
    xyz = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    parts = encode(Frame(_header(), {"xyz": xyz, "t": xyz.transpose(1, 0, 2), "be": xyz.astype(">f4")}))
    assert isinstance(parts[1], memoryview) and np.shares_memory(np.frombuffer(parts[1], np.float32), xyz)
    out = decode(parts)
    np.testing.assert_array_equal(out.arrays["t"], xyz.transpose(1, 0, 2))
    np.testing.assert_array_equal(out.arrays["be"], xyz)  # big-endian input travels little-endian
    assert out.arrays["be"].dtype == np.float32


def test_decode_over_real_socket_is_zero_copy_view_of_the_message():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        big = np.random.default_rng(1).normal(size=(128, 128, 3)).astype(np.float32)  # > 64 KiB: not copied
        a.send_multipart(encode(Frame(_header(), {"xyz": big})), copy=False)
        assert b.poll(2000)
        parts = b.recv_multipart(copy=False)
        out = decode(parts)
        np.testing.assert_array_equal(out.arrays["xyz"], big)
        assert not out.arrays["xyz"].flags.owndata and not out.arrays["xyz"].flags.writeable
    finally:
        ctx.destroy(linger=0)


def test_encode_refuses_dtypes_outside_the_allow_list():
    with pytest.raises(WireError, match="object"):
        encode(Frame(_header(), {"bad": np.array([object()])}))
    with pytest.raises(WireError, match="complex128"):
        encode(Frame(_header(), {"bad": np.zeros(2, np.complex128)}))


def _meta(name="a", dtype="uint8", shape=(4,)):
    return {"name": name, "dtype": dtype, "shape": list(shape)}


MALFORMED = [
    ("no parts", [], "empty message"),
    ("not msgpack", [b"\xc1\xc1garbage"], "not valid msgpack"),
    ("header not a map", [msgpack.packb([1, 2])], "must be a msgpack map"),
    ("no schema", _parts({"arrays": []}), "no 'schema'"),
    ("unknown schema", _parts({"schema": 2, "arrays": []}), "unknown schema version 2"),
    ("unknown key", _parts({"schema": 1, "arrays": [], "pickle": 1}), "unknown header key 'pickle'"),
    ("negative frame id", _parts({"schema": 1, "arrays": [], "frame_id": -1}), "'frame_id'"),
    ("bool frame id", _parts({"schema": 1, "arrays": [], "frame_id": True}), "'frame_id'"),
    ("unknown status", _parts({"schema": 1, "arrays": [], "status": "MAYBE"}), "'status'"),
    ("bad stamps", _parts({"schema": 1, "arrays": [], "t": {"capture": [1]}}), "'t'"),
    ("nan score", _parts({"schema": 1, "arrays": [], "score": float("nan")}), "'score'"),
    ("bad region", _parts({"schema": 1, "arrays": [], "regions": [{"x": 1}]}), "'regions'"),
    ("arrays not a list", _parts({"schema": 1, "arrays": {}}), "'arrays'"),
    ("array entry keys", _parts({"schema": 1, "arrays": [{"name": "a"}]}, b""), "exactly name, dtype, shape"),
    ("dtype object", _parts({"schema": 1, "arrays": [_meta(dtype="object")]}, b"1234"), "dtype 'object'"),
    ("dtype complex", _parts({"schema": 1, "arrays": [_meta(dtype="complex64")]}, b"1234"), "not allowed"),
    ("negative dim", _parts({"schema": 1, "arrays": [_meta(shape=(-4,))]}, b"1234"), "shape"),
    ("too many dims", _parts({"schema": 1, "arrays": [_meta(shape=(1,) * 5)]}, b"1"), "shape"),
    ("float dim", _parts({"schema": 1, "arrays": [{"name": "a", "dtype": "uint8", "shape": [2.0]}]}, b"12"), "shape"),
    ("byte count", _parts({"schema": 1, "arrays": [_meta(dtype="float32", shape=(2, 3))]}, b"x" * 20),
     "needs 24 bytes, buffer has 20"),
    ("missing buffer", _parts({"schema": 1, "arrays": [_meta(), _meta("b")]}, b"1234"),
     "lists 2 arrays but the message has 1"),
    ("extra buffer", _parts({"schema": 1, "arrays": []}, b"1234"), "lists 0 arrays but the message has 1"),
    ("duplicate name", _parts({"schema": 1, "arrays": [_meta(), _meta()]}, b"1234", b"1234"), "appears twice"),
    ("empty name", _parts({"schema": 1, "arrays": [_meta(name="")]}, b"1234"), "name"),
    ("too many arrays", _parts({"schema": 1, "arrays": [_meta(f"a{i}", shape=(1,)) for i in range(MAX_ARRAYS + 1)]},
                               *[b"1"] * (MAX_ARRAYS + 1)), "over the limit"),
    ("oversize header", [b"\x00" * (MAX_HEADER_BYTES + 1)], "over the"),
]


@pytest.mark.parametrize("parts, problem", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_decode_rejects_malformed_messages_with_a_clear_error(parts, problem):
    with pytest.raises(WireError, match=problem) as info:
        decode(parts, where="test message")
    assert isinstance(info.value, DataError)
    assert str(info.value).startswith("test message")


def test_decode_refuses_frames_over_the_byte_limit_and_names_the_frame():
    parts = encode(Frame(_header(), {"rgb": np.zeros((64, 64, 3), np.uint8)}))
    assert decode(parts, max_bytes=64 * 64 * 3).arrays["rgb"].shape == (64, 64, 3)
    with pytest.raises(WireError, match=r"frame 7\).*12288 bytes of arrays, over the 1000-byte limit"):
        decode(parts, where="ingress", max_bytes=1000)


def test_ingress_keys_accept_camera_headers_and_refuse_runtime_fields():
    camera = encode(Frame({"source": "cam0/part-41"}, {"rgb": np.zeros((2, 2, 3), np.uint8)}))
    assert decode(camera, allowed_keys=INGRESS_KEYS).header["source"] == "cam0/part-41"
    spoofed = encode(Frame({"frame_id": 3, "status": "OK"}, {"rgb": np.zeros((2, 2, 3), np.uint8)}))
    with pytest.raises(WireError, match="unknown header key"):
        decode(spoofed, allowed_keys=INGRESS_KEYS)


def test_control_messages_round_trip_and_reject_garbage():
    assert unpack_msg(pack_msg("credit", n=2, done=[1, 2])) == {"kind": "credit", "n": 2, "done": [1, 2]}
    for bad, problem in ((b"\xc1", "not valid msgpack"), (msgpack.packb({"n": 1}), "string 'kind'"),
                         (msgpack.packb([1]), "string 'kind'")):
        with pytest.raises(WireError, match=problem):
            unpack_msg(bad)

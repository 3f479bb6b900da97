"""Sparkplug B payloads (Eclipse Sparkplug 3.0, ``sparkplug_b.proto``) for the MQTT bridge.

The message classes are built at import from a descriptor written here in code (the
subset of ``org.eclipse.tahu.protobuf.Payload`` this bridge uses, with the proto's own
field numbers), so encoding is done by the maintained ``protobuf`` runtime and no
generated ``_pb2`` file or extra Sparkplug library is needed. Fields not declared
here (metadata, properties, datasets, templates) are simply never written.

Topics: ``spBv1.0/GROUP/NBIRTH|NDEATH/NODE`` and ``spBv1.0/GROUP/DBIRTH|DDATA/NODE/DEVICE``
(device = station id). ``seq`` runs 0..255 per MQTT session, NBIRTH is 0; NDEATH
(the last will) carries the session's ``bdSeq``.
"""

from __future__ import annotations

import time

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

NAMESPACE = "spBv1.0"
SEQ_MODULO = 256
# Sparkplug B DataType enumeration (sparkplug_b.proto)
INT64, UINT64, DOUBLE, BOOLEAN, STRING, DATETIME = 4, 8, 10, 11, 12, 13
# Payload.Metric value fields by data type: (field name, python conversion)
_VALUE_FIELD = {INT64: "long_value", UINT64: "long_value", DOUBLE: "double_value",
                BOOLEAN: "boolean_value", STRING: "string_value", DATETIME: "long_value"}  # fmt: skip


def _build_payload_class():
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="edge_sparkplug_b.proto", package="org.eclipse.tahu.protobuf",
                                              syntax="proto2")  # fmt: skip
    payload = file.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    opt = f.LABEL_OPTIONAL
    for name, number, ftype, in_oneof in (
        ("name", 1, f.TYPE_STRING, False), ("alias", 2, f.TYPE_UINT64, False),
        ("timestamp", 3, f.TYPE_UINT64, False), ("datatype", 4, f.TYPE_UINT32, False),
        ("is_historical", 5, f.TYPE_BOOL, False), ("is_transient", 6, f.TYPE_BOOL, False),
        ("is_null", 7, f.TYPE_BOOL, False),
        ("int_value", 10, f.TYPE_UINT32, True), ("long_value", 11, f.TYPE_UINT64, True),
        ("float_value", 12, f.TYPE_FLOAT, True), ("double_value", 13, f.TYPE_DOUBLE, True),
        ("boolean_value", 14, f.TYPE_BOOL, True), ("string_value", 15, f.TYPE_STRING, True),
        ("bytes_value", 16, f.TYPE_BYTES, True),
    ):  # fmt: skip
        field = metric.field.add(name=name, number=number, type=ftype, label=opt)
        if in_oneof:
            field.oneof_index = 0
    payload.field.add(name="timestamp", number=1, type=f.TYPE_UINT64, label=opt)
    payload.field.add(name="metrics", number=2, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                      type_name=".org.eclipse.tahu.protobuf.Payload.Metric")  # fmt: skip
    payload.field.add(name="seq", number=3, type=f.TYPE_UINT64, label=opt)
    payload.field.add(name="uuid", number=4, type=f.TYPE_STRING, label=opt)
    payload.field.add(name="body", number=5, type=f.TYPE_BYTES, label=opt)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


Payload = _build_payload_class()

# The metrics of one decision (DBIRTH declares them, each DDATA carries them).
RESULT_METRICS = (
    ("Result/PartId", INT64, "frame_id"),
    ("Result/RunId", STRING, "run_id"),
    ("Result/Decision", STRING, "decision"),
    ("Result/Reason", STRING, "reason"),
    ("Result/Score", DOUBLE, "score"),
    ("Result/Threshold", DOUBLE, "threshold"),
    ("Result/CaptureTime", DATETIME, "capture_ms"),
    ("Result/ProcessingTimeMs", DOUBLE, "e2e_ms"),
    ("Result/Model", STRING, "model"),
    ("Result/BundleHash", STRING, "bundle_hash"),
    ("Result/Replayed", BOOLEAN, "replayed"),
    ("Result/DedupKey", STRING, "dedup_key"),
)


def topic(group: str, kind: str, node: str, device: str | None = None) -> str:
    return "/".join([NAMESPACE, group, kind, node] + ([device] if device else []))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _add(payload, name: str, datatype: int, value, ts: int) -> None:
    m = payload.metrics.add(name=name, datatype=datatype, timestamp=ts)
    if value is None:
        m.is_null = True
    elif datatype == INT64:
        m.long_value = int(value) & 0xFFFFFFFFFFFFFFFF  # two's complement in the uint64 field
    else:
        setattr(m, _VALUE_FIELD[datatype], value)


def result_values(record: dict, replayed: bool, key: str) -> dict:
    """The decision record's fields under the names ``RESULT_METRICS`` reads."""
    return {**record, "capture_ms": record["capture_ns"] // 1_000_000,
            "e2e_ms": record["stages_ms"].get("e2e"), "replayed": replayed, "dedup_key": key}  # fmt: skip


def nbirth(seq: int, bd_seq: int) -> bytes:
    p = Payload(timestamp=now_ms(), seq=seq)
    _add(p, "bdSeq", UINT64, bd_seq, p.timestamp)
    _add(p, "Node Control/Rebirth", BOOLEAN, False, p.timestamp)
    return p.SerializeToString()


def ndeath(bd_seq: int) -> bytes:
    p = Payload(timestamp=now_ms())
    _add(p, "bdSeq", UINT64, bd_seq, p.timestamp)
    return p.SerializeToString()


def dbirth(seq: int, alive: bool | None, last: dict | None) -> bytes:
    """Device birth: every metric, with the last result's values (or null)."""
    p = Payload(timestamp=now_ms(), seq=seq)
    _add(p, "Alive", BOOLEAN, alive, p.timestamp)
    for name, dtype, field in RESULT_METRICS:
        _add(p, name, dtype, None if last is None else last.get(field), p.timestamp)
    return p.SerializeToString()


def ddata_result(seq: int, values: dict) -> bytes:
    ts = values["decision_ns"] // 1_000_000
    p = Payload(timestamp=ts, seq=seq)
    for name, dtype, field in RESULT_METRICS:
        _add(p, name, dtype, values.get(field), ts)
    return p.SerializeToString()


def ddata_alive(seq: int, alive: bool) -> bytes:
    p = Payload(timestamp=now_ms(), seq=seq)
    _add(p, "Alive", BOOLEAN, alive, p.timestamp)
    return p.SerializeToString()


def decode(data: bytes) -> dict:
    """``{"timestamp", "seq", "metrics": {name: value}}`` of a payload (for consumers and tests)."""
    p = Payload.FromString(data)
    metrics = {}
    for m in p.metrics:
        if m.is_null:
            value = None
        else:
            which = m.WhichOneof("value")
            value = getattr(m, which) if which else None
            if m.datatype == INT64 and value is not None and value >= 2**63:
                value -= 2**64
        metrics[m.name] = value
    return {"timestamp": p.timestamp, "seq": p.seq if p.HasField("seq") else None, "metrics": metrics}

"""``edge-alerts`` flags for the bridges, their checks, and building the sinks.

Kept here so that the gateway (edge_runtime/cli/alerts.py) stays about the alert
channel; the bridge modules (and their optional packages) are imported only when a
flag asks for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

from edge_runtime.errors import EdgeError
from edge_runtime.line.sinks import Sink
from edge_runtime.line.state import default_state_path

MQTT_SCHEMES = ("mqtt", "mqtts", "mqtt+unix")
OPCUA_SCHEME = "opc.tcp"


def add_bridge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OPC UA bridge (pip install asyncua)")
    add = g.add_argument
    add("--opcua", metavar="URL", help="host an OPC UA server for the PLC, e.g. opc.tcp://127.0.0.1:4840/edge")
    add("--opcua-ack-timeout", type=float, default=2.0, metavar="S",
        help="re-offer a result the PLC did not acknowledge after S seconds (default %(default)s)")
    add("--opcua-cert", type=Path, metavar="FILE", help="server certificate (DER/PEM) for Basic256Sha256")
    add("--opcua-key", type=Path, metavar="FILE", help="private key (PEM) of --opcua-cert")
    add("--opcua-secure", action="store_true",
        help="Basic256Sha256 SignAndEncrypt only, even on loopback (always so off loopback)")
    add("--opcua-write", metavar="URL", help="write each result into an existing OPC UA server (with --node-map)")
    add("--node-map", type=Path, metavar="FILE", help="JSON {field: node id} for --opcua-write (docs/line.md)")
    add("--allow-remote", action="store_true",
        help="let the OPC UA server bind a non-loopback address (then with certificates only)")
    g = p.add_argument_group("MQTT bridge (pip install paho-mqtt)")
    add = g.add_argument
    add("--mqtt", metavar="URL", help="publish to a broker: mqtt://HOST:PORT, mqtts://HOST:PORT, mqtt+unix:///PATH")
    add("--sparkplug", metavar="GROUP/NODE", help="Sparkplug B payloads and topics (spBv1.0/GROUP/.../NODE)")
    add("--mqtt-prefix", default="edge", metavar="P", help="topic root of the JSON tree (default %(default)s)")
    add("--mqtt-client-id", metavar="ID", help="MQTT client id (default edge-alerts-<station|all>)")
    add("--mqtt-spool", type=Path, metavar="FILE",
        help="on-disk outbox (default beside the gateway state: mqtt-<client id>.sqlite)")
    add("--mqtt-username", metavar="USER", help="MQTT user name (with --mqtt-password-file)")
    add("--mqtt-password-file", type=Path, metavar="FILE", help="file holding the password (first line)")
    add("--mqtt-ca", type=Path, metavar="FILE", help="CA certificate(s) for mqtts:// (default: system store)")
    add("--mqtt-cert", type=Path, metavar="FILE", help="client certificate for mqtts://")
    add("--mqtt-key", type=Path, metavar="FILE", help="client key for mqtts://")


def check_bridge_options(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag that is wrong."""
    if args.opcua is not None and urlsplit(args.opcua).scheme != OPCUA_SCHEME:
        raise ValueError(f"--opcua {args.opcua}: expected {OPCUA_SCHEME}://HOST:PORT[/PATH]")
    if args.opcua_write is not None:
        if urlsplit(args.opcua_write).scheme != OPCUA_SCHEME:
            raise ValueError(f"--opcua-write {args.opcua_write}: expected {OPCUA_SCHEME}://HOST:PORT[/PATH]")
        if args.node_map is None:
            raise ValueError("--opcua-write needs --node-map FILE")
    elif args.node_map is not None:
        raise ValueError("--node-map is only for --opcua-write")
    if (args.opcua_cert is None) != (args.opcua_key is None):
        raise ValueError("--opcua-cert and --opcua-key go together")
    if args.opcua_ack_timeout <= 0:
        raise ValueError("--opcua-ack-timeout must be > 0 seconds")
    if args.mqtt is not None and urlsplit(args.mqtt).scheme not in MQTT_SCHEMES:
        raise ValueError(f"--mqtt {args.mqtt}: expected one of {', '.join(s + '://' for s in MQTT_SCHEMES)}")
    mqtt_only = ("sparkplug", "mqtt_client_id", "mqtt_spool", "mqtt_username", "mqtt_password_file",
                 "mqtt_ca", "mqtt_cert", "mqtt_key")  # fmt: skip
    for name in mqtt_only:
        if getattr(args, name) is not None and args.mqtt is None:
            raise ValueError(f"--{name.replace('_', '-')} needs --mqtt URL")
    if args.sparkplug is not None:
        parts = args.sparkplug.split("/")
        if len(parts) != 2 or not all(parts) or any(c in args.sparkplug for c in "+#"):
            raise ValueError(f"--sparkplug {args.sparkplug!r}: expected GROUP/NODE (no '+', '#')")


def _need(module: str, package: str, flag: str):
    try:
        return __import__(module)
    except ImportError:
        raise EdgeError(f"{flag} needs the {package} package: pip install {package}") from None


def build_sinks(args: argparse.Namespace) -> list[Sink]:
    """The sinks the flags ask for (started: servers bound, clients connecting)."""
    sinks: list[Sink] = []
    try:
        if args.opcua is not None:
            _need("asyncua", "asyncua", "--opcua")
            from edge_runtime.line.opcua import OpcUaServerSink

            sinks.append(OpcUaServerSink(args.opcua, ack_timeout_s=args.opcua_ack_timeout,
                                         cert=args.opcua_cert, key=args.opcua_key,
                                         secure=args.opcua_secure, allow_remote=args.allow_remote))  # fmt: skip
            print(f"edge-alerts: OPC UA server listening on {sinks[-1].url}", file=sys.stderr, flush=True)
        if args.opcua_write is not None:
            _need("asyncua", "asyncua", "--opcua-write")
            from edge_runtime.line.opcua import OpcUaWriterSink, load_node_map

            sinks.append(OpcUaWriterSink(args.opcua_write, load_node_map(args.node_map)))
        if args.mqtt is not None:
            _need("paho.mqtt", "paho-mqtt", "--mqtt")
            from edge_runtime.line.mqtt import MqttSink, MqttSettings

            client_id = args.mqtt_client_id or f"edge-alerts-{args.station or 'all'}"
            spool = args.mqtt_spool
            if spool is None:
                base = Path(args.state).parent if args.state else default_state_path(args.station).parent
                spool = base / f"mqtt-{client_id}.sqlite"
            password = None
            if args.mqtt_password_file is not None:
                try:
                    password = args.mqtt_password_file.read_text(encoding="utf-8").splitlines()[0]
                except (OSError, IndexError) as exc:
                    raise EdgeError(f"--mqtt-password-file {args.mqtt_password_file}: cannot read a password "
                                    f"({exc})") from None  # fmt: skip
            settings = MqttSettings(
                url=args.mqtt, client_id=client_id, prefix=args.mqtt_prefix, sparkplug=args.sparkplug,
                spool=spool, username=args.mqtt_username, password=password,
                ca=args.mqtt_ca, cert=args.mqtt_cert, key=args.mqtt_key,
            )  # fmt: skip
            sinks.append(MqttSink(settings))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))

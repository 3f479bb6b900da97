"""The OPC UA bridge: a real asyncua client against the gateway's server (the real
edge-alerts in a subprocess), and the real gateway writing into a real asyncua server."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("asyncua", reason="asyncua is not installed (pip install asyncua)")
from asyncua import Client, Server, ua  # noqa: E402

from edge_runtime.cli.alerts import main  # noqa: E402
from edge_runtime.line.opcua import NAMESPACE_URI, _LoopThread  # noqa: E402
from test_edge_alerts import Station, record  # noqa: E402

F = float(os.environ.get("EDGE_TEST_TIME_FACTOR", "1"))
pytestmark = pytest.mark.timeout(180 * F)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def start_gateway(st, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli.alerts", "--endpoint", st.pub_ep, "--replay-endpoint",
         st.replay_ep, "--no-state", "--opcua", "opc.tcp://127.0.0.1:0/edge", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    end = time.monotonic() + 60 * F
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if "OPC UA server listening on " in line:
            threading.Thread(target=lambda: sys.stderr.write(proc.stderr.read()), daemon=True).start()  # drained, shown on failure
            return proc, line.rsplit(" ", 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the gateway's OPC UA server did not come up")


async def wait_value(node, predicate, what, seconds=20):
    end = time.monotonic() + seconds * F
    while time.monotonic() < end:
        value = await node.read_value()
        if predicate(value):
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_plc_reads_every_result_acknowledges_it_and_sees_heartbeat_loss(tmp_path):
    go, done = threading.Event(), threading.Event()
    decisions = ["OK", "NOT_OK", "ERROR", "OK", "NOT_DECIDABLE"]

    def script(st):
        assert go.wait(60 * F)
        st.wait_subscribed()
        for fid, decision in enumerate(decisions):
            r = record(fid, decision=decision)
            if decision in ("ERROR", "NOT_DECIDABLE"):
                r["reason"], r["score"] = "inference worker infer0.0 died", None
            st.pub.publish(r)
            st.tick_for(0.01)
        while not done.is_set():  # keep heartbeating while the PLC works
            st.tick_for(0.02)
        st.mute.set()  # vision stops: no more heartbeats

    with Station(tmp_path, script) as st:
        proc, url = start_gateway(st, "--heartbeat-timeout", str(0.6 * F), "--opcua-ack-timeout", str(1.0 * F),
                                  "--from-frame", "0")  # fmt: skip
        try:
            go.set()
            seen = asyncio.run(plc(url, len(decisions), done))
        finally:
            proc.terminate()
            proc.wait(30)
    assert [s["PartId"] for s in seen["results"]] == list(range(5))
    assert [s["Decision"] for s in seen["results"]] == ["OK", "NotOK", "NotDecidable", "OK", "NotDecidable"]
    assert seen["results"][2]["Reason"] == "inference worker infer0.0 died"
    assert seen["results"][2]["StationDecision"] == "ERROR"
    assert seen["reoffered_same_part"] and seen["alive_before"] is True and seen["alive_after"] is False
    assert proc.returncode == 0


async def plc(url, n, done):
    """What a PLC does: on each counter change read the offered result and acknowledge
    it (a re-offer of a part already taken is simply acknowledged again)."""
    out = {"results": [], "reoffered_same_part": False}
    async with Client(url, timeout=10) as client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        node = lambda name: client.get_node(ua.NodeId(f"st1.{name}", ns))  # noqa: E731
        counter, taken = 0, set()
        while len(out["results"]) < n:
            counter = await wait_value(node("ResultCounter"), lambda v, c=counter: v != c, f"result {len(taken)}")
            result = {k: await node(f"LastResult.{k}").read_value()
                      for k in ("PartId", "Decision", "Reason", "StationDecision", "Score")}  # fmt: skip
            part = result["PartId"]
            if part in taken:
                out["reoffered_same_part"] |= part == 1
            else:
                taken.add(part)
                out["results"].append(result)
                if part == 1:  # do not acknowledge: the same result must be offered again
                    continue
            if part % 2:
                ok = await client.get_node(ua.NodeId("st1", ns)).call_method(
                    ua.NodeId("st1.Acknowledge", ns), ua.Variant(part, ua.VariantType.Int64))
                assert ok is True
            else:
                await node("AckPartId").write_value(ua.DataValue(ua.Variant(part, ua.VariantType.Int64)))
        assert await wait_value(node("Pending"), lambda v: v == 0, "an empty queue") == 0
        out["alive_before"] = await node("Alive").read_value()
        done.set()
        out["alive_after"] = await wait_value(node("Alive"), lambda v: v is False, "Alive false", seconds=10)
    return out


def test_opcua_write_updates_the_plc_server_nodes(tmp_path, capsys):
    lt = _LoopThread("test-plc-server")

    async def plc_server():
        server = Server()
        await server.init()
        server.set_endpoint("opc.tcp://127.0.0.1:0/plc")
        ns = await server.register_namespace("urn:test:plc")
        line = await server.nodes.objects.add_object(ua.NodeId("Line", ns), f"{ns}:Line")
        nodes = {}
        for name, value, vtype in (("PartId", 0, ua.VariantType.Int32), ("Decision", "", ua.VariantType.String),
                                   ("Score", 0.0, ua.VariantType.Float), ("Counter", 0, ua.VariantType.UInt32),
                                   ("Alive", False, ua.VariantType.Boolean)):  # fmt: skip
            nodes[name] = await line.add_variable(ua.NodeId(f"Line.{name}", ns), f"{ns}:{name}", ua.Variant(value, vtype))
            await nodes[name].set_writable()
        await server.start()
        return server, ns, nodes

    server, ns, nodes = lt.run(plc_server())
    url = f"opc.tcp://127.0.0.1:{server.bserver.port}/plc"
    node_map = tmp_path / "nodes.json"
    node_map.write_text(json.dumps({"part_id": f"ns={ns};s=Line.PartId", "decision": f"ns={ns};s=Line.Decision",
                                    "score": f"ns={ns};s=Line.Score", "counter": f"ns={ns};s=Line.Counter"}))

    def script(st):
        st.wait_subscribed()
        for fid in range(3):
            st.pub.publish(record(fid, decision="NOT_OK" if fid == 2 else "OK"))
            st.tick_for(0.01)

    try:
        with Station(tmp_path, script) as st:
            rc = main(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--opcua-write", url,
                       "--node-map", str(node_map), "--max-messages", "3", "--timeout", str(30 * F)])  # fmt: skip
        values = lt.run(_read_all(nodes))
    finally:
        lt.run(server.stop())
        lt.stop()
    assert rc == 0
    assert values == {"PartId": 2, "Decision": "NotOK", "Score": pytest.approx(0.5), "Counter": 3, "Alive": False}


async def _read_all(nodes):
    return {name: await node.read_value() for name, node in nodes.items()}


def test_bad_node_map_and_remote_bind_are_refused_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "nodes.json"
    bad.write_text(json.dumps({"part": "ns=2;s=X"}))
    rc = main(["--opcua-write", "opc.tcp://127.0.0.1:4841", "--node-map", str(bad), "--no-state", "--timeout", "0.1"])
    assert rc == 1 and "unknown node-map field 'part'" in capsys.readouterr().err
    rc = main(["--opcua", "opc.tcp://0.0.0.0:4840/edge", "--no-state", "--timeout", "0.1"])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to serve OPC UA" in err and "--allow-remote" in err


def _certs(tmp_path, name, app_uri, use):
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key, cert = tmp_path / f"{name}.pem", tmp_path / f"{name}.der"
    asyncio.run(setup_self_signed_certificate(key, cert, app_uri, "localhost", [getattr(ExtendedKeyUsageOID, use)],
                                              {"countryName": "DE", "organizationName": "edge", "commonName": name}))
    return cert, key


def test_secure_server_speaks_basic256sha256_only(tmp_path):
    pytest.importorskip("cryptography")
    server_cert, server_key = _certs(tmp_path, "server", "urn:freeopcua:python:server", "SERVER_AUTH")
    client_cert, client_key = _certs(tmp_path, "client", "urn:test:plc", "CLIENT_AUTH")

    go = threading.Event()

    def script(st):
        assert go.wait(60 * F)
        st.pub.publish(record(0, decision="NOT_OK"))  # --from-frame 0: replayed if not seen live

    with Station(tmp_path, script) as st:
        proc, url = start_gateway(st, "--opcua-secure", "--opcua-cert", str(server_cert), "--opcua-key",
                                  str(server_key), "--from-frame", "0")  # fmt: skip
        go.set()
        try:
            async def plc():
                plain = Client(url, timeout=10)
                with pytest.raises(Exception):  # no SecurityPolicy None endpoint to talk to
                    await plain.connect()
                    ns = await plain.get_namespace_index(NAMESPACE_URI)
                    await plain.get_node(ua.NodeId("st1.ResultCounter", ns)).read_value()
                await _quiet(plain)
                client = Client(url, timeout=10)
                client.application_uri = "urn:test:plc"
                await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{client_cert},{client_key}")
                async with client:
                    ns = await client.get_namespace_index(NAMESPACE_URI)
                    await wait_value(client.get_node(ua.NodeId("st1.ResultCounter", ns)), lambda v: v > 0, "a result")
                    return await client.get_node(ua.NodeId("st1.LastResult.Decision", ns)).read_value()

            assert asyncio.run(plc()) == "NotOK"
        finally:
            proc.terminate()
            proc.wait(30)


async def _quiet(client):
    try:
        await client.disconnect()
    except Exception:  # noqa: BLE001
        pass

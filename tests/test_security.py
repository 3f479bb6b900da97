"""Bind policy, CURVE keys and encryption, client allow-listing, message-size caps (real sockets)."""

import os
import stat
import time

import pytest
import zmq

from edge_runtime.errors import DataError
from edge_runtime.pipeline import security
from edge_runtime.pipeline.security import BindPolicyError, check_bind


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:5556", "tcp://127.8.9.1:1", "tcp://localhost:5557", "tcp://[::1]:5555",
     "tcp://127.0.0.1:*", "ipc:///tmp/x/alerts.sock", "inproc://stage"],
)  # fmt: skip
def test_local_endpoints_bind_without_flag(endpoint):
    check_bind(endpoint, allow_remote=False)


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://192.168.1.20:5556", "tcp://eth0:5556",
     "tcp://[::]:5556", "tcp://plc-gw.local:5556", "pgm://eth0;239.192.1.1:5555", "ws://0.0.0.0:80"],
)  # fmt: skip
def test_network_endpoints_need_allow_remote(endpoint):
    with pytest.raises(BindPolicyError, match="--allow-remote"):
        check_bind(endpoint, allow_remote=False)
    check_bind(endpoint, allow_remote=True)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5556", "tcp://127.0.0.1", "tcp://127.0.0.1:port", "ipc://", ""])
def test_malformed_endpoints_are_refused_even_with_flag(endpoint):
    with pytest.raises(BindPolicyError, match="malformed endpoint"):
        check_bind(endpoint, allow_remote=True)


def test_generate_and_load_keys(tmp_path):
    public, secret = security.generate_keys(tmp_path / "keys")
    assert (public.name, secret.name) == ("edge.key", "edge.key_secret")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    keys = security.load_keys(tmp_path / "keys")
    assert len(keys.public) == 40 and len(keys.secret) == 40
    assert security.load_public_key(public) == keys.public
    assert zmq.curve_public(keys.secret) == keys.public  # a consistent pair
    with pytest.raises(DataError, match="already exists"):
        security.generate_keys(tmp_path / "keys")
    security.generate_keys(tmp_path / "keys", name="other")
    with pytest.raises(DataError, match="2 \\*.key_secret files"):
        security.load_keys(tmp_path / "keys")
    with pytest.raises(DataError, match="holds no secret key"):
        security.load_keys(public)
    broken = tmp_path / "broken.key_secret"
    broken.write_text("metadata\ncurve\n    public-key = \"tooshort\"\n")
    with pytest.raises(DataError, match="broken.key_secret"):
        security.load_keys(broken)
    with pytest.raises(DataError, match="does not exist"):
        security.load_public_key(tmp_path / "missing.key")


def _pub_sub(ctx, server_keys, client_setup, topic=b"st1.OK", wait_s=1.0):
    """Publish repeatedly on a CURVE PUB; return what one SUB (configured by
    client_setup) received within wait_s."""
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    security.apply_curve_server(pub, server_keys)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    client_setup(sub)
    sub.subscribe(b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    got = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not got:
        pub.send_multipart([topic, b"payload"])
        if sub.poll(50):
            got.append(sub.recv_multipart())
    pub.close()
    sub.close()
    return got


def test_curve_client_with_server_key_receives_and_others_do_not(tmp_path):
    public, _ = security.generate_keys(tmp_path / "server")
    ctx = zmq.Context()
    try:
        good = _pub_sub(ctx, tmp_path / "server", lambda s: security.apply_curve_client(s, None, public))
        assert good == [[b"st1.OK", b"payload"]]
        plain = _pub_sub(ctx, tmp_path / "server", lambda s: None, wait_s=0.5)
        assert plain == []
        wrong_server = zmq.curve_keypair()[0]
        wrong = _pub_sub(ctx, tmp_path / "server", lambda s: security.apply_curve_client(s, None, wrong_server), wait_s=0.5)
        assert wrong == []
    finally:
        ctx.term()


def test_authorize_clients_accepts_only_listed_keys(tmp_path):
    public, _ = security.generate_keys(tmp_path / "server")
    security.generate_keys(tmp_path / "allowed", name="gateway")
    security.generate_keys(tmp_path / "stranger", name="stranger")
    ctx = zmq.Context()
    with pytest.raises(DataError, match="client key directory does not exist"):
        security.authorize_clients(ctx, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no client public keys"):
        security.authorize_clients(ctx, tmp_path / "empty")
    auth = security.authorize_clients(ctx, tmp_path / "allowed")
    try:
        listed = _pub_sub(ctx, tmp_path / "server", lambda s: security.apply_curve_client(s, tmp_path / "allowed", public))
        assert listed == [[b"st1.OK", b"payload"]]
        stranger = _pub_sub(
            ctx, tmp_path / "server", lambda s: security.apply_curve_client(s, tmp_path / "stranger", public), wait_s=0.5
        )
        assert stranger == []
    finally:
        auth.stop()
        ctx.term()


def test_max_msg_size_drops_oversize_message_and_socket_survives():
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    security.set_max_msg(pull, 1000)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        push.send(b"small-1")
        assert pull.poll(2000) and pull.recv() == b"small-1"
        push.send(b"B" * 5000)  # oversize: libzmq drops the peer's connection, never delivers it
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"small-2" not in got:
            try:
                push.send(b"small-2", zmq.NOBLOCK)  # the pusher reconnects on its own
            except zmq.Again:
                pass
            if pull.poll(50):
                got.append(pull.recv())
        assert b"small-2" in got
        assert all(len(m) <= 1000 for m in got)
    finally:
        push.close()
        pull.close()
        ctx.term()
    with pytest.raises(ValueError, match="positive"):
        security.set_max_msg(pull, 0)

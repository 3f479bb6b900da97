"""Network security helpers for every ZeroMQ socket of the runtime.

Three independent layers (docs/alerts.md, "Security"):

* **Bind policy** — ``check_bind`` / ``bind``: a socket may bind a loopback tcp address
  (127.0.0.0/8, ::1, ``localhost``) or a local transport (``ipc://``, ``inproc://``)
  freely; anything that reaches the network (``tcp://0.0.0.0``, ``tcp://*``, a LAN
  address, an interface name, pgm/udp/ws...) needs the explicit ``allow_remote`` flag
  (``edge-run --allow-remote``).
* **CURVE** (ZeroMQ's CurveZMQ: Curve25519 key exchange, encrypted and
  server-authenticated links) — ``generate_keys`` writes a key pair in ZeroMQ's own
  certificate format (``zmq.auth.create_certificates``, the files ``czmq``/``zmq.auth``
  tools read): ``<name>.key`` holds only the public key (safe to hand out),
  ``<name>.key_secret`` holds both keys (mode 0600, keep on the host that owns it).
  ``apply_curve_server`` / ``apply_curve_client`` configure a socket;
  ``authorize_clients`` adds client allow-listing (a ZAP handler that accepts only the
  public keys found in a directory). Without it any client that knows the server's
  public key may connect: CURVE alone gives confidentiality and server authentication.
* **Message-size caps** — ``set_max_msg`` sets ``zmq.MAXMSGSIZE`` on a receiving
  socket: a peer that sends a larger message part is disconnected by libzmq before
  the message is delivered (the receiving socket keeps working; a tcp peer
  reconnects on its own). ``MAX_MESSAGE_BYTES`` is the default for frame-carrying
  sockets.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edge_runtime.errors import DataError, EdgeError

# Default cap (bytes) for one inbound message part on frame-carrying sockets: an
# 1600 x 1200 frame (uint8 RGB 5.8 MB + float32 xyz 23 MB) fits with room to spare;
# anything larger is refused before it is buffered.
MAX_MESSAGE_BYTES = 64 * 2**20

_LOCAL_TRANSPORTS = ("ipc", "inproc")
_TCP_RE = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:/\[\]]+):(?P<port>\d{1,5}|\*)$")


class BindPolicyError(EdgeError, ValueError):
    """An endpoint is malformed, or would expose a socket to the network without
    the explicit allow-remote flag."""


def _tcp_host_is_loopback(host: str) -> bool:
    """True when a tcp bind host (IP literal, ``[v6]`` or ``localhost``) is loopback."""
    host = host[1:-1] if host.startswith("[") else host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name ("eth0", "lo") or a host name
        return False


def check_bind(endpoint: str, allow_remote: bool) -> None:
    """Refuse to bind ``endpoint`` when it reaches beyond this host, unless allowed.

    Local endpoints: ``ipc://...``, ``inproc://...``, ``tcp://127.x.y.z:PORT``,
    ``tcp://[::1]:PORT``, ``tcp://localhost:PORT``. Every other endpoint (wildcards,
    LAN addresses, interface names, other transports) raises ``BindPolicyError``
    unless ``allow_remote`` is true. A malformed endpoint always raises.
    """
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise BindPolicyError(
            f"malformed endpoint {endpoint!r}: expected TRANSPORT://ADDRESS, e.g. tcp://127.0.0.1:5556"
        )
    transport, address = endpoint.split("://", 1)
    if transport in _LOCAL_TRANSPORTS:
        if not address:
            raise BindPolicyError(f"malformed endpoint {endpoint!r}: empty {transport} address")
        return
    if transport == "tcp":
        match = _TCP_RE.match(endpoint)
        if match is None:
            raise BindPolicyError(f"malformed endpoint {endpoint!r}: expected tcp://HOST:PORT")
        if _tcp_host_is_loopback(match["host"]):
            return
    if not allow_remote:
        raise BindPolicyError(
            f"refusing to bind {endpoint}: it is reachable from the network, not only from this host. "
            "Bind a loopback address (tcp://127.0.0.1:PORT) or an ipc:// path, or pass --allow-remote "
            "(and protect the socket with --curve-keys) to expose it deliberately."
        )


def bind(sock: zmq.Socket, endpoint: str, allow_remote: bool = False) -> None:
    """``check_bind`` then ``sock.bind``; a failing bind names the endpoint."""
    check_bind(endpoint, allow_remote)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise EdgeError(f"cannot bind {endpoint}: {exc}") from None


def set_max_msg(sock: zmq.Socket, n: int = MAX_MESSAGE_BYTES) -> None:
    """Cap one inbound message part at ``n`` bytes (``zmq.MAXMSGSIZE``).

    libzmq disconnects a peer that sends a larger part; the message is never
    delivered and the receiving socket stays usable. Set it on every receiving socket.
    """
    if n <= 0:
        raise ValueError(f"max message size must be a positive number of bytes, got {n}")
    sock.setsockopt(zmq.MAXMSGSIZE, int(n))


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE key pair as z85-encoded bytes (40 characters each), and where it came from."""

    public: bytes
    secret: bytes
    path: str | None = None


def generate_keys(out_dir: str | Path, name: str = "edge", overwrite: bool = False) -> tuple[Path, Path]:
    """Create a CURVE key pair with ``zmq.curve_keypair`` (via ``zmq.auth.create_certificates``).

    Writes ``out_dir/<name>.key`` (public key only) and ``out_dir/<name>.key_secret``
    (public + secret key, permissions 0600), ZeroMQ's certificate format. Returns
    ``(public_path, secret_path)``. Refuses to replace existing keys unless
    ``overwrite`` (replacing a station's keys locks out every gateway that pinned them).
    """
    out = Path(out_dir)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for existing in (public, secret):
        if existing.exists() and not overwrite:
            raise DataError(existing, "key file already exists; remove it or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret file must never be readable by others, not even briefly
        try:
            zmq.auth.create_certificates(out, name)
        finally:
            os.umask(old_umask)
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
    except OSError as exc:
        raise DataError(out, f"cannot write CURVE keys: {exc.strerror or exc}") from None
    return public, secret


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """Read one ZeroMQ certificate file; errors name the file."""
    if not path.is_file():
        raise DataError(path, "key file does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise DataError(path, f"not a ZeroMQ CURVE certificate ({exc})") from None
    if public is None or len(public) != 40:
        raise DataError(path, "certificate has no valid z85 public-key (40 characters)")
    if secret is not None and len(secret) != 40:
        raise DataError(path, "certificate has an invalid z85 secret-key (expected 40 characters)")
    return public, secret


def load_keys(path: str | Path) -> CurveKeys:
    """Load a key pair from a ``*.key_secret`` file, or from a directory holding exactly one."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.key_secret"))
        if len(found) != 1:
            problem = "no *.key_secret file" if not found else f"{len(found)} *.key_secret files; name one"
            raise DataError(path, f"expected one CURVE secret key file (edge-run --gen-keys DIR), found {problem}")
        path = found[0]
    public, secret = _load_certificate(path)
    if secret is None:
        raise DataError(path, "certificate holds no secret key; pass the *.key_secret file (or its directory)")
    return CurveKeys(public=public, secret=secret, path=str(path))


def load_public_key(path: str | Path) -> bytes:
    """The z85 public key from a ``*.key`` (or ``*.key_secret``) certificate file."""
    return _load_certificate(Path(path))[0]


def _as_keys(keys: CurveKeys | str | Path) -> CurveKeys:
    return keys if isinstance(keys, CurveKeys) else load_keys(keys)


def apply_curve_server(sock: zmq.Socket, keys: CurveKeys | str | Path) -> CurveKeys:
    """Make ``sock`` a CURVE server with ``keys`` (a CurveKeys, a secret file or its
    directory). Must be called before bind. Returns the loaded keys."""
    keys = _as_keys(keys)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    return keys


def apply_curve_client(
    sock: zmq.Socket, keys: CurveKeys | str | Path | None, server_public: bytes | str | Path
) -> CurveKeys:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_public``
    (z85 bytes, or a ``*.key`` file). ``keys`` is the client's own pair; None makes
    a fresh in-memory pair (fine unless the server allow-lists clients). Must be
    called before connect. Returns the client keys used."""
    if keys is None:
        public, secret = zmq.curve_keypair()
        keys = CurveKeys(public=public, secret=secret)
    else:
        keys = _as_keys(keys)
    if not isinstance(server_public, bytes):
        server_public = load_public_key(server_public)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public
    return keys


def check_clients_dir(clients_dir: str | Path) -> Path:
    """The allow-list directory, checked: it exists and holds at least one ``*.key``
    (each a valid certificate). ``DataError`` naming the directory or file otherwise."""
    clients_dir = Path(clients_dir)
    if not clients_dir.is_dir():
        raise DataError(clients_dir, "client key directory does not exist")
    keys = sorted(clients_dir.glob("*.key"))
    if not keys:
        raise DataError(clients_dir, "no client public keys (*.key) in the directory: nobody could connect")
    for key in keys:
        load_public_key(key)
    return clients_dir


def authorize_clients(context: zmq.Context, clients_dir: str | Path) -> ThreadAuthenticator:
    """Start a ZAP handler on ``context`` accepting only CURVE clients whose public
    key is in a ``*.key`` file in ``clients_dir``. Applies to every CURVE server
    socket of that context; call ``.stop()`` on the result before closing the context."""
    clients_dir = check_clients_dir(clients_dir)
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients_dir))
    return auth

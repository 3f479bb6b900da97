"""A private Mosquitto broker for tests, benchmarks and trying the MQTT bridge.

``Mosquitto(workdir)`` writes a config into ``workdir`` and runs the ``mosquitto``
binary (Debian: ``apt-get install mosquitto``) listening on a unix socket there
(``url`` = ``mqtt+unix://WORKDIR/broker.sock``: no port to pick, no race) and, if
``tcp_port`` is given, on ``127.0.0.1:PORT`` too. Sessions and queued messages are
persisted after every change, so ``kill()`` (SIGKILL) + ``start()`` is a broker crash
and restart that keeps subscribers' sessions.

    python -m edge_runtime.line.mosquitto /tmp/broker --port 1883    # until Ctrl-C
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_runtime.errors import EdgeError

BINARY = "mosquitto"
SOCKET_NAME = "broker.sock"


def find_binary() -> str | None:
    return shutil.which(BINARY) or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


class Mosquitto:
    def __init__(self, workdir: str | Path, tcp_port: int | None = None, users: dict[str, str] | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = find_binary()
        if self.binary is None:
            raise EdgeError("the mosquitto broker is not installed (apt-get install mosquitto)")
        self.socket = self.dir / SOCKET_NAME
        self.tcp_port = tcp_port
        self.url = f"mqtt+unix://{self.socket}"
        self.proc: subprocess.Popen | None = None
        lines = [
            f"user {getpass.getuser()}",  # as root, mosquitto would otherwise switch to user 'mosquitto'
            f"listener 0 {self.socket}",
            "allow_anonymous true" if not users else "allow_anonymous false",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_on_changes true",
            "autosave_interval 1",
            "log_dest stderr",
            "max_queued_messages 100000",
        ]
        if tcp_port is not None:
            lines.insert(2, f"listener {tcp_port} 127.0.0.1")
        if users:  # username/password authentication (mosquitto_passwd hashes the file)
            passwd = self.dir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            tool = shutil.which("mosquitto_passwd")
            if tool is None:
                raise EdgeError("mosquitto_passwd is not installed (it comes with the mosquitto package)")
            subprocess.run([tool, "-U", str(passwd)], check=True, capture_output=True)
            lines.append(f"password_file {passwd}")
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.socket.unlink(missing_ok=True)
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        log.close()
        end = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                tail = (self.dir / "mosquitto.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise EdgeError(f"mosquitto did not start: {tail}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash (whatever was not autosaved is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run a private mosquitto broker in DIR until Ctrl-C")
    p.add_argument("dir", type=Path)
    p.add_argument("--port", type=int, help="also listen on 127.0.0.1:PORT")
    args = p.parse_args(argv)
    with Mosquitto(args.dir, args.port) as broker:
        print(f"broker up: {broker.url}" + (f" and mqtt://127.0.0.1:{args.port}" if args.port else ""), flush=True)
        try:
            broker.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

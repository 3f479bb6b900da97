"""A camera driver for ``edge-run --source zmq+tcp://HOST:PORT``: pushes frames in the wire format.

    edge-run --model cfm-tiny --source zmq+tcp://127.0.0.1:5555 &
    python examples/camera_sender.py --endpoint tcp://127.0.0.1:5555 --fps 2 --frames 20
    python examples/camera_sender.py --endpoint tcp://127.0.0.1:5555 --dir DATASET_ROOT --category puck

One frame = one ZeroMQ multipart message on a PUSH socket (docs/wire.md, "Ingress"):

    part 0: msgpack map {"schema": 1, "arrays": [{"name", "dtype", "shape"}, ...], "source": "<your part id>"}
    part 1..: the raw C-order little-endian bytes of each array, in the order listed:
              "rgb" uint8 H x W x 3 (RGB order), "xyz" float32 H x W x 3 metres (0,0,0 = no point)

Only "schema", "arrays", "kind" ("frame") and "source" (a string, e.g. the PLC's part
number; it comes back in the decision record) are accepted. The runtime numbers the
frames itself (frame_id, gap-free from 0 per run) and stamps the capture time on receipt.

A camera cannot wait for the inspection: the socket is sent to with NOBLOCK and a small
high-water mark, so when the station is not reading (stopped, overloaded beyond its own
drop-oldest queue) this sender drops the frame and counts it instead of stalling the
acquisition loop. Frames come from the synthetic station (default) or an MVTec 3D-AD
layout directory (test split), both through edge_runtime's readers; the encoding below is
written out by hand (msgpack + numpy buffers) to show a driver needs nothing else.
"""

from __future__ import annotations

import argparse
import time
from itertools import cycle, islice

import msgpack
import numpy as np
import zmq
import zmq.auth


def encode_frame(rgb: np.ndarray, xyz: np.ndarray | None, source: str) -> list:
    """The ingress message for one acquisition (see the module docstring)."""
    arrays = [("rgb", np.ascontiguousarray(rgb, dtype=np.uint8))]
    if xyz is not None:
        arrays.append(("xyz", np.ascontiguousarray(xyz, dtype="<f4")))
    header = {"schema": 1, "source": source,
              "arrays": [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays]}
    return [msgpack.packb(header, use_bin_type=True), *(memoryview(a).cast("B") for _, a in arrays)]


def frames(args):
    """(rgb, xyz, source) tuples from the synthetic station or a dataset directory."""
    if args.dir:
        from edge_runtime.data.mvtec import MVTec3D

        data = MVTec3D(args.dir)
        refs = [r for c in ([args.category] if args.category else data.categories()) for r in data.index(c, "test")]
        for ref in cycle(refs):
            s = ref.load()
            yield s.rgb, s.xyz, ref.key
    else:
        from edge_runtime.data.synth import SynthStation

        station = SynthStation(size=args.size, seed=0)
        for s in station.stream(args.category or station.categories[0], defect_rate=0.2):
            yield s.rgb, s.xyz, f"synth/{s.stem}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="edge-run's ingress (default %(default)s)")
    ap.add_argument("--fps", type=float, default=2.0, help="acquisition rate (default %(default)s)")
    ap.add_argument("--frames", type=int, default=20, help="frames to send (default %(default)s)")
    ap.add_argument("--dir", help="MVTec 3D-AD layout directory to send (test split, looped); default: synthetic")
    ap.add_argument("--category", help="category (synthetic station or directory)")
    ap.add_argument("--size", type=int, default=224, help="synthetic frame side in pixels (default %(default)s)")
    ap.add_argument("--curve-server-key", help="station's CURVE public key file (*.key) when edge-run uses --curve-keys")
    args = ap.parse_args()

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 2)  # at most a couple of frames buffered here
    push.setsockopt(zmq.LINGER, 1000)  # on exit, give queued frames 1 s to leave, then drop them
    if args.curve_server_key:
        public, secret = zmq.curve_keypair()
        push.curve_publickey, push.curve_secretkey = public, secret
        push.curve_serverkey = zmq.auth.load_certificate(args.curve_server_key)[0]
    push.connect(args.endpoint)
    if not push.poll(10_000, zmq.POLLOUT):
        print(f"camera: no station listening at {args.endpoint} yet; frames will be dropped until it is")
    sent = dropped = 0
    period = 1.0 / args.fps
    next_t = time.monotonic()
    for rgb, xyz, source in islice(frames(args), args.frames):
        next_t += period
        try:
            push.send_multipart(encode_frame(rgb, xyz, source), flags=zmq.NOBLOCK, copy=False)
            sent += 1
        except zmq.Again:  # station not taking frames: the camera moves on
            dropped += 1
        time.sleep(max(0.0, next_t - time.monotonic()))
    print(f"camera: sent {sent} frames, dropped {dropped} (station not reading) to {args.endpoint}")
    push.close()
    ctx.term()


if __name__ == "__main__":
    main()

"""Control messages between the supervisor and the stage processes, and credits between stages.

Every control message is a small msgpack map ``{"kind": KIND, ...fields}``
(``wire.pack_msg`` / ``wire.unpack_msg``). The kinds are named here once; no module
writes them as string literals.

stage -> supervisor (over the supervisor's ROUTER, identity = stage name):

* ``HELLO``     the stage is up (fields: what it loaded, bound endpoints)
* ``SUBSCRIBED`` alert: ``RunConfig.wait_subscribers`` gateways have subscribed (capture may start)
* ``BEAT``      progress heartbeat, about every ``BEAT_S`` (the stall watchdog)
* ``EOS``       capture: end of capture, ``captured`` frames
* ``STATS``     alert: a statistics snapshot ``snap``; ``FINAL``: the last one
* ``LOG``       a line for the operator (``text``)
* ``FATAL``     the stage failed (``error``) and exits
* ``OVERDUE``   preprocess: worker ``worker`` holds frame ``frame_id`` past its deadline

supervisor -> stage:

* ``START``     capture: begin acquiring; ``STOP``: stop acquiring
* ``DEAD``      preprocess: worker ``worker`` is gone (``how``): report the frames it held
* ``FINALIZE``  alert: record every still-missing id below ``captured`` as ERROR ``reason``
* ``QUIT``      exit now

between stages (DEALER/ROUTER links):

* ``CREDIT``    ``n`` more frames may be sent; from workers also ``done`` (finished ids)
"""

from __future__ import annotations

HELLO = "hello"
SUBSCRIBED = "subscribed"
BEAT = "beat"
EOS = "eos"
STATS = "stats"
FINAL = "final"
LOG = "log"
FATAL = "fatal"
OVERDUE = "overdue"

START = "start"
STOP = "stop"
DEAD = "dead"
FINALIZE = "finalize"
QUIT = "quit"

CREDIT = "credit"

KINDS = frozenset({HELLO, SUBSCRIBED, BEAT, EOS, STATS, FINAL, LOG, FATAL, OVERDUE, START, STOP, DEAD, FINALIZE, QUIT, CREDIT})

BEAT_S = 1.0  # stages send BEAT this often from their loop
CONTROL_MAX_BYTES = 1 << 20  # cap on control / credit messages (snapshots are a few KB)
POLL_MS = 50  # stage loop poll period: bounds reaction time to control messages
INGRESS_COUNTS = ("disconnects", "refused", "camera_closed", "unclassified")  # summary["ingress"]
LINGER_MS = 500  # every socket: how long close() may spend flushing

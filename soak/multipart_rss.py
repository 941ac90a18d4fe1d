"""What one multipart message costs a receiver before it can see any of it (libzmq 4.3.5).

A ZeroMQ pipe publishes a message to its reader only once the message is
complete, and counts a multipart message as one toward RCVHWM; MAXMSGSIZE
bounds each frame, not their number. So a peer holding a registered key can
make a cell hold frames x frame size bytes per message before zcells counts a
single frame, whatever zcells does on its side. This measures it: a sender
process sends complete messages of FRAMES frames of 1 MiB to a ROUTER (CURVE
off, RCVHWM 2, MAXMSGSIZE 1 MiB) that reads nothing, and the ROUTER's RSS is
printed for each size, then one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

SENDER = """
import sys, time, zmq
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER)
d.connect(sys.argv[1])
frame = b"x" * ((1 << 20) - 64)
for _ in range(int(sys.argv[2])):
    d.send(frame, zmq.SNDMORE)
d.send(b"end")
time.sleep(30)
"""


def rss_mb() -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(frames: int) -> dict[str, float]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.maxmsgsize = 1 << 20
    router.rcvhwm = 2
    port = router.bind_to_random_port("tcp://127.0.0.1")
    before = rss_mb()
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, f"tcp://127.0.0.1:{port}", str(frames)]
    )
    try:
        deadline = time.monotonic() + 60
        while not router.poll(100) and time.monotonic() < deadline:
            pass
        held = rss_mb()  # the whole message is in, and not one frame read
    finally:
        sender.kill()
        sender.wait()
        router.close(0)
        ctx.destroy(0)
    return {"frames": frames, "rss_before_mb": round(before, 1), "rss_held_mb": round(held, 1)}


def main() -> None:
    rows = [measure(frames) for frames in (2, 100, 300)]
    for row in rows:
        print(
            f"{row['frames']:>4} frames of 1 MiB: receiver RSS {row['rss_before_mb']:.0f} -> "
            f"{row['rss_held_mb']:.0f} MB before it can read the first frame"
        )
    print(json.dumps({"libzmq": zmq.zmq_version(), "messages": rows}))


if __name__ == "__main__":
    main()

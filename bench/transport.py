"""Transport benchmark: zcells ping and forwarding against raw pyzmq, measured in one run.

Baseline: a raw pyzmq ROUTER echo server in its own process and a DEALER
client, CURVE on, ~300-byte msgpack bodies packed and unpacked at both ends.
Then the same machine runs a real tree api -> c1 -> g1 of `zcells serve`
processes and measures:

* ping round trip to the connected cell (1 hop) and to g1 (3 hops), p50/p99;
* one-way casts from a client through api to c1 (one forwarding cell), as
  messages per second handled at c1. The casts are encoded beforehand and
  sent by a raw DEALER, so the figure is the cells' rate, not the sender's.

For scale it also measures a bare Python forwarder: a process that takes
each message off a CURVE ROUTER, unpacks and repacks its header with the
next hop stamped, and sends it on over a CURVE DEALER, checking nothing.
No Python cell can forward faster than that on the same machine, so its
ratio to raw throughput shows how much of the gap is Python's, not zcells'.

Every figure is the median of three rounds.

Beside each throughput it prints the CPU time each process spent per
message (all its threads, libzmq's included), and the most CPU per message
the whole path may use if the forwarding target is to be met on this
machine, with every core busy all the time: cores / (0.4 x raw rate).

Targets: 1-hop ping p50 within 2.5x of the raw round trip; forwarding
throughput at least 40% of raw one-way throughput. The last line is JSON.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Report, cpu_seconds, median, summary_us
from zcells import codec
from zcells.devtree import CellTree, free_ports
from zcells.messages import Direction, Targeted, new_message_id

BODY = {
    "instance": "0f8e2a3c-6a55-4c1e-9d1e-3b9a8d2f5e11",
    "name": "web-01",
    "flavor": "m1.small",
    "image": "cirros-0.6.2",
    "vm_state": "active",
    "task_state": None,
    "power_state": "running",
    "host": "h12",
    "cell": "api!eu!eu-1",
    "meta": {"role": "frontend", "tier": "1", "owner": "ops"},
    "version": 42,
    "updated_at": 1764000000.123,
    "fill": "x" * 40,
}
ROUND_TRIPS = int(os.environ.get("BENCH_ROUND_TRIPS", "2000"))
CASTS = int(os.environ.get("BENCH_CASTS", "20000"))


def _raw_server(
    endpoint: str, secret: bytes, ready: multiprocessing.synchronize.Event, casts: int
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.rcvhwm = sock.sndhwm = 100_000
    sock.bind(endpoint)
    ready.set()
    counted = 0
    while True:
        rid, body = sock.recv_multipart()
        message = msgpack.unpackb(body)
        if message.get("cast"):
            counted += 1
            if counted == casts:
                sock.send_multipart([rid, msgpack.packb({"done": counted})])
                counted = 0
            continue
        if message.get("stop"):
            break
        sock.send_multipart([rid, msgpack.packb(message)])
    sock.close(0)
    ctx.term()


ROUNDS = 3


def _count_sink(endpoint: str, secret: bytes, ready: Any, casts: int, rates: Any) -> None:
    """A raw ROUTER that unpacks each message and reports messages/s for each batch of casts."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.rcvhwm = 0
    sock.bind(endpoint)
    ready.set()
    for _ in range(ROUNDS):
        _, header, _ = sock.recv_multipart()
        started = time.perf_counter()
        for _ in range(casts - 1):
            _, header, _ = sock.recv_multipart()
            msgpack.unpackb(header)
        rates.put((casts - 1) / (time.perf_counter() - started))
    sock.close(0)
    ctx.term()


def _bare_forwarder(
    listen: str, secret: bytes, sink: str, sink_public: bytes, ready: Any, casts: int
) -> None:
    """Take each message off a ROUTER, stamp the next hop on its header, send it on."""
    ctx = zmq.Context()
    inbound = ctx.socket(zmq.ROUTER)
    inbound.curve_server = True
    inbound.curve_secretkey = secret
    inbound.rcvhwm = 0
    inbound.bind(listen)
    outbound = ctx.socket(zmq.DEALER)
    outbound.curve_serverkey = sink_public
    outbound.curve_publickey, outbound.curve_secretkey = zmq.curve_keypair()
    outbound.sndhwm = 0
    outbound.connect(sink)
    ready.set()
    for _ in range(ROUNDS * casts):
        _, header, body = inbound.recv_multipart()
        fields = msgpack.unpackb(header)
        fields["hops"] += 1
        fields["path"].append("api")
        fields["id"] = os.urandom(16)
        fields["ts"] = time.time()
        outbound.send_multipart([msgpack.packb(fields), body])
    inbound.close(0)
    outbound.close(linger=10_000)  # the last round is still on its way to the sink
    ctx.term()


def bare_forwarder(report: Report, raw_rate: float) -> None:
    """Casts through the bare Python forwarder to a raw sink: the ceiling for any Python hop."""
    sink_public, sink_secret = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    sink_at, listen = (f"tcp://127.0.0.1:{port}" for port in free_ports(2))
    ready_sink, ready_forwarder = multiprocessing.Event(), multiprocessing.Event()
    rates: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_count_sink, args=(sink_at, sink_secret, ready_sink, CASTS, rates)
        ),
        multiprocessing.Process(
            target=_bare_forwarder,
            args=(listen, secret, sink_at, sink_public, ready_forwarder, CASTS),
        ),
    ]
    for proc in procs:
        proc.start()
    samples: list[float] = []
    cpus: list[float] = []
    ctx = zmq.Context()
    try:
        if not (ready_sink.wait(10) and ready_forwarder.wait(10)):
            raise SystemExit("the bare forwarder did not start")
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey = public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.sndhwm = 0
        sock.connect(listen)
        forwarder = procs[1].pid
        assert forwarder is not None
        for _ in range(ROUNDS):
            frames = _casts(CASTS, "api!c1")
            cpu_before = cpu_seconds(forwarder)
            for message in frames:
                sock.send_multipart(message)
            samples.append(rates.get(timeout=120))
            cpus.append((cpu_seconds(forwarder) - cpu_before) / CASTS * 1e6)
        sock.close(0)
    finally:
        ctx.term()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    report.figure("bare_python_forward_msgs_per_s", median(samples), "msg/s", raw_rate)
    report.figure("bare_forwarder_cpu_us_per_msg", median(cpus), "us")


def raw_baseline(report: Report) -> tuple[float, float]:
    """Raw pyzmq figures, each the median of `ROUNDS` rounds (the machine is noisy)."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ready = multiprocessing.Event()
    server = multiprocessing.Process(
        target=_raw_server, args=(endpoint, server_secret, ready, CASTS)
    )
    server.start()
    server_pid = server.pid
    assert server_pid is not None
    ready.wait(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
        server_public,
        client_public,
        client_secret,
    )
    sock.sndhwm = 1_000_000
    sock.connect(endpoint)
    print(f"message body: {len(msgpack.packb(BODY))} bytes of msgpack", flush=True)
    for _ in range(200):  # warm up: handshake, caches
        sock.send(msgpack.packb(BODY))
        msgpack.unpackb(sock.recv())
    p50s, p99s, rates, cpus = [], [], [], []
    for _ in range(ROUNDS):
        samples = []
        for _ in range(ROUND_TRIPS):
            started = time.perf_counter()
            sock.send(msgpack.packb(BODY))
            msgpack.unpackb(sock.recv())
            samples.append(time.perf_counter() - started)
        rtt = summary_us(samples)
        p50s.append(rtt["p50_us"])
        p99s.append(rtt["p99_us"])
        cast = dict(BODY, cast=True)
        cpu_before = cpu_seconds(server_pid)
        started = time.perf_counter()
        for _ in range(CASTS):
            sock.send(msgpack.packb(cast))
        msgpack.unpackb(sock.recv())
        rates.append(CASTS / (time.perf_counter() - started))
        cpus.append((cpu_seconds(server_pid) - cpu_before) / CASTS * 1e6)
    report.figure("raw_rtt_p50_us", median(p50s), "us")
    report.figure("raw_rtt_p99_us", median(p99s), "us")
    report.figure("raw_oneway_msgs_per_s", median(rates), "msg/s")
    report.figure("raw_receiver_cpu_us_per_msg", median(cpus), "us")
    budget = (os.cpu_count() or 1) / (0.4 * median(rates)) * 1e6
    report.figure("forward_target_cpu_budget_us_per_msg", budget, "us")
    sock.send(msgpack.packb({"stop": True}))
    sock.close(0)
    ctx.term()
    server.join(10)
    return median(p50s), median(rates)


def _casts(count: int, target: str) -> list[list[bytes]]:
    """Casts encoded ahead of time, so sending them costs the sender almost nothing."""
    now = time.time()
    return [
        codec.encode(
            Targeted(
                id=new_message_id(),
                method="ping",
                body={"payload": BODY},
                direction=Direction.DOWN,
                path=(),
                hops=0,
                max_hops=10,
                want_response=False,
                timeout_ms=60_000,
                sent_at=now,
                context=None,
                target=target,
            )
        )
        for _ in range(count)
    ]


def _blast(tree: CellTree, frames: list[list[bytes]]) -> None:
    """Send pre-encoded casts from a raw DEALER holding the admin client's key."""
    api = tree.cells["api"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = api.keys.public.encode()
    keys = tree.clients["load"]  # its own name: replies to "ops" must not come here
    sock.curve_publickey = keys.public.encode()
    sock.curve_secretkey = keys.secret.encode()
    sock.sndhwm = 1_000_000
    sock.linger = 60_000
    sock.connect(api.api_endpoint)
    for message in frames:
        sock.send_multipart(message)
    sock.close()
    ctx.term()


def _cell_cpu(tree: CellTree, name: str) -> float:
    proc = tree.cells[name].proc
    assert proc is not None
    return cpu_seconds(proc.pid)


async def zcells_figures(report: Report, tree: CellTree, raw_p50: float, raw_rate: float) -> None:
    async with tree.client(timeout_s=10) as client:
        deadline = time.monotonic() + 30
        while not all(r.ok for r in await client.ping_all(timeout_s=2)):
            if time.monotonic() > deadline:
                raise SystemExit("the tree did not come up")
            await asyncio.sleep(0.1)
        for label, target in (("1hop", "api"), ("3hop", "api!c1!g1")):
            for _ in range(200):
                await client.call("ping", {"payload": BODY}, target=target)
            p50s, p99s = [], []
            for _ in range(ROUNDS):
                samples = []
                for _ in range(ROUND_TRIPS):
                    started = time.perf_counter()
                    result = await client.call("ping", {"payload": BODY}, target=target)
                    samples.append(time.perf_counter() - started)
                    assert result.ok
                rtt = summary_us(samples)
                p50s.append(rtt["p50_us"])
                p99s.append(rtt["p99_us"])
            report.figure(f"zcells_ping_{label}_p50_us", median(p50s), "us", raw_p50)
            report.figure(f"zcells_ping_{label}_p99_us", median(p99s), "us")
            if label == "1hop":
                report.check("1hop ping p50 <= 2.5x raw rtt", median(p50s) <= 2.5 * raw_p50)

        async def handled() -> int:
            stats = (await client.call("stats", {}, target="api!c1")).unwrap()
            return int(stats.get("handled", 0))

        rates: list[float] = []
        cpus: dict[str, list[float]] = {"api": [], "c1": []}
        for _ in range(ROUNDS):
            frames = _casts(CASTS, "api!c1")
            before = await handled()
            cpu_before = {name: _cell_cpu(tree, name) for name in cpus}
            started = time.perf_counter()
            await asyncio.to_thread(_blast, tree, frames)
            deadline = time.monotonic() + 120
            while (await handled()) - before < CASTS:  # the stats calls add one each
                if time.monotonic() > deadline:
                    raise SystemExit("casts did not all arrive")
                await asyncio.sleep(0.005)
            rates.append(CASTS / (time.perf_counter() - started))
            for name, spent in cpus.items():
                spent.append((_cell_cpu(tree, name) - cpu_before[name]) / CASTS * 1e6)
        rate = median(rates)
        report.figure("zcells_forward_msgs_per_s", rate, "msg/s", raw_rate)
        report.figure("zcells_forwarding_cell_cpu_us_per_msg", median(cpus["api"]), "us")
        report.figure("zcells_target_cell_cpu_us_per_msg", median(cpus["c1"]), "us")
        report.check("forwarding >= 40% of raw throughput", rate >= 0.4 * raw_rate)


def main() -> None:
    report = Report("transport")
    print(f"round trips: {ROUND_TRIPS}, casts: {CASTS}, cpus: {os.cpu_count()}", flush=True)
    raw_p50, raw_rate = raw_baseline(report)
    bare_forwarder(report, raw_rate)
    with tempfile.TemporaryDirectory(prefix="zcells-bench-") as tmp:
        tree = CellTree(
            {"api": {"c1": {"g1": {}}}},
            Path(tmp),
            log_level="warning",
            extra_clients=("load",),
            mute_child_interval=60,
            heartbeat_interval=5,
            call_timeout=30,
        )
        try:
            tree.start()
            asyncio.run(zcells_figures(report, tree, raw_p50, raw_rate))
        finally:
            tree.stop()
    report.finish()


if __name__ == "__main__":
    main()

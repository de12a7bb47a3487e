"""A network link with latency and a bandwidth cap in front of a server on loopback, for tests and benchmarks.

    with S3Server() as s3, SlowLink(s3.port, rtt_ms=20, mbit_s=1000) as link:
        link.endpoint                           # http://127.0.0.1:PORT: the server, through the link

A TCP proxy in a child process (so that DataLoader workers forked meanwhile do not inherit its socket): every
chunk a side sends reaches the other side half the round-trip time later, and each direction passes at most
``mbit_s`` over all connections together (a token bucket, as ``tc ... tbf`` shapes a link; the kernel's
``netem``, which adds latency, is missing here). Up to :data:`BUFFER_BYTES` wait in each direction of a
connection, so a fast sender is held back the way a full TCP window holds it back. Run as a module it
is that child: ``python -m hipscale.tools.slow_link LISTEN_PORT TARGET_PORT RTT_MS MBIT_S``.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys

from hipscale.tools.local_storage import start_server_process, stop_server_process
from hipscale.training.distributed import free_port

CHUNK_BYTES = 256 << 10
BUFFER_BYTES = 16 << 20  # in flight per direction of a connection: above 10 Gbit/s x 10 ms
BURST_S = 0.02  # a link idle for this long may pass this long's bytes at once (tbf's burst)


class _Bandwidth:
    """One direction of the link: bytes leave no faster than `bytes_per_s` on average, in the order they are
    offered. Up to :data:`BURST_S` of unused time is credited, so a sleep that wakes late does not lower the
    rate (without it, every late wake-up is bandwidth lost: 20-40% at 1 Gbit/s and 256 KiB chunks)."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self.free_at = 0.0

    async def pass_through(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        start = max(loop.time() - BURST_S, self.free_at)
        self.free_at = start + count / self.bytes_per_s
        await asyncio.sleep(self.free_at - loop.time())


async def _carry(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay_s: float,
                 bandwidth: _Bandwidth) -> None:
    """Moves one direction of a connection: each chunk delayed by `delay_s`, then paced by `bandwidth`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    queued = [0]  # bytes in the queue
    room = asyncio.Event()
    room.set()

    async def receive() -> None:
        try:
            while data := await source.read(CHUNK_BYTES):
                await room.wait()
                queued[0] += len(data)
                if queued[0] >= BUFFER_BYTES:
                    room.clear()
                queue.put_nowait((loop.time() + delay_s, data))
        except ConnectionError:
            pass
        queue.put_nowait((loop.time() + delay_s, b""))

    async def send() -> None:
        try:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                await bandwidth.pass_through(len(data))
                sink.write(data)
                await sink.drain()
                queued[0] -= len(data)
                if queued[0] < BUFFER_BYTES:
                    room.set()
        except ConnectionError:
            pass
        finally:
            sink.close()

    await asyncio.gather(receive(), send())


async def _serve(listen_port: int, target_port: int, rtt_ms: float, mbit_s: float) -> None:
    delay_s, rate = rtt_ms / 2000, mbit_s * 1e6 / 8
    upstream, downstream = _Bandwidth(rate), _Bandwidth(rate)

    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_carry(client_reader, server_writer, delay_s, upstream),
                             _carry(server_reader, client_writer, delay_s, downstream))

    server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


class SlowLink:
    """The proxy, for the lifetime of the ``with`` block.

    Args:
        target_port: The server's port on 127.0.0.1.
        rtt_ms: Round-trip time the link adds.
        mbit_s: Each direction's cap (megabits per second).

    Attributes:
        port: Where the link listens; endpoint: ``http://127.0.0.1:PORT``.
    """

    def __init__(self, target_port: int, rtt_ms: float, mbit_s: float, start_timeout_s: float = 30.0) -> None:
        self.target_port, self.rtt_ms, self.mbit_s = target_port, rtt_ms, mbit_s
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "SlowLink":
        self.process = start_server_process([sys.executable, "-m", "hipscale.tools.slow_link", str(self.port),
                                             str(self.target_port), str(self.rtt_ms), str(self.mbit_s)],
                                            self.port, self.start_timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_server_process(self.process)


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))

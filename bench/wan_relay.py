"""A TCP relay that adds a fixed one-way delay in each direction, for bench/wan.py.

This kernel has the tbf qdisc (bandwidth) but not netem (delay), so propagation delay is added
here: every chunk read is written on ``delay`` seconds after it arrived, in order, on each side
of the connection. What the relay holds per direction is bounded (``--buffer`` bytes): beyond it
it stops reading, so a sender meets the backpressure a slow link gives, and the relay never
buffers without end. bench/wan.py measures the round-trip time it gives.

    python bench/wan_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT --delay 0.03 [--buffer 4194304]
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, limit: int) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    held = 0
    room = asyncio.Event()
    room.set()

    async def deliver() -> None:
        nonlocal held
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            held -= len(data)
            if held < limit:
                room.set()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            await room.wait()
            data = await reader.read(1 << 16)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
            held += len(data)
            if held >= limit:
                room.clear()
        await sender
    except (ConnectionError, asyncio.CancelledError):
        sender.cancel()
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen")
    parser.add_argument("target")
    parser.add_argument("--delay", type=float, required=True, help="one-way delay, seconds")
    parser.add_argument("--buffer", type=int, default=4 << 20, help="bytes held per direction at most")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    to_host, to_port = args.target.rsplit(":", 1)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer, args.delay, args.buffer),
                             pump(up_reader, writer, args.delay, args.buffer), return_exceptions=True)

    server = await asyncio.start_server(connection, host, int(port))
    print("relay ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

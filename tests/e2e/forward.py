"""A TCP forwarder for the multi-host tests: ``python -m tests.e2e.forward HOST PORT TARGET_PORT [...]`` listens on
HOST:PORT and relays every connection to 127.0.0.1:TARGET_PORT (several triples at once). It lets processes in the
test's network namespaces reach the machine's PostgreSQL and Redis, which listen on loopback only."""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _serve(host: str, port: int, target: int) -> asyncio.Server:
    async def relay(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return await asyncio.start_server(relay, host, port)


async def main(args: list[str]) -> None:
    servers = [await _serve(args[i], int(args[i + 1]), int(args[i + 2])) for i in range(0, len(args), 3)]
    print("forwarding", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

"""An asyncio application offloading work to a running gaspar daemon over one pipelined
connection: ``python examples/asyncio_client.py 127.0.0.1:10123``."""

from __future__ import annotations

import asyncio
import sys

from gaspar import aio


async def main(address: str) -> None:
    async with aio.Client(address, timeout=30) as client:
        replies = await asyncio.gather(*(client.request(b"job %d" % i) for i in range(8)))
        for reply in replies:
            print(reply)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:10123"))

"""What one upstream call costs a Python client on httpx alone: the floor under facegate's miss.

Run as its own process (``python -m bench.upstream_floor URL KEY IMAGE N``): N sequential POSTs
of the image to the simulator on one kept-alive httpx.AsyncClient under uvloop, as facegate's
upstream call makes them (multipart with ``files=``), and prints the process's CPU seconds
per call. Row 2 compares facegate's CPU per miss with the baseline app's per request plus this.
"""

from __future__ import annotations

import sys
import time

import httpx
import uvloop

from app.upstream import contract


async def calls(url: str, key: str, image: bytes, n: int) -> float:
    async with httpx.AsyncClient(timeout=30) as http:

        async def one() -> None:
            files = {contract.IMAGE_FIELD: ("image.jpg", image, "image/jpeg")}
            async with http.stream("POST", url, headers={contract.KEY_HEADER: key}, files=files) as response:
                await response.aread()
                response.raise_for_status()

        for _ in range(20):  # warm-up: connection open, code paths loaded
            await one()
        cpu = time.process_time()
        for _ in range(n):
            await one()
        return (time.process_time() - cpu) / n


def main() -> None:
    url, key, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(path, "rb") as f:
        image = f.read()
    print(f"{uvloop.run(calls(url, key, image, n)) * 1000:.3f}")


if __name__ == "__main__":
    main()

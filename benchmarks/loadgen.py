"""A small HTTP/1.1 keep-alive load generator on raw asyncio streams (one process, one core).

Each connection is one client with its own session cookie, updated from `Set-Cookie` as a browser
would. Returns requests per second and latency percentiles.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000 if ordered else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        return self.percentile(0.99)


async def _client(host: str, port: int, method: str, path: str, cookie: str, deadline: float, out: Result) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            if cookie:
                head += f"Cookie: {cookie}\r\n"
            started = time.perf_counter()
            writer.write((head + "\r\n").encode())
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.lower()
                if name == "content-length":
                    length = int(value)
                elif name == "set-cookie":
                    pair = value.strip().split(";", 1)[0]
                    if pair.split("=", 1)[1]:
                        cookie = pair
            await reader.readexactly(length)
            out.latencies.append(time.perf_counter() - started)
            out.requests += 1
            if not status_line.startswith(b"HTTP/1.1 2"):
                out.errors += 1
    finally:
        writer.close()
    return cookie


async def run(
    host: str, port: int, method: str, path: str, cookies: list[str], seconds: float, warmup: float = 1.0
) -> tuple[Result, list[str]]:
    """Hit *path* from one connection per cookie for *seconds* (after *warmup*); return the cookies as updated."""
    if warmup:
        scratch = Result(0, 0, [], 0)
        deadline = time.perf_counter() + warmup
        cookies = list(
            await asyncio.gather(*(_client(host, port, method, path, c, deadline, scratch) for c in cookies))
        )
    result = Result(0, seconds, [], 0)
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    cookies = list(await asyncio.gather(*(_client(host, port, method, path, c, deadline, result) for c in cookies)))
    result.seconds = time.perf_counter() - started
    return result, cookies

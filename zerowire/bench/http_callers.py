"""HTTP callers of the coordinator benchmark: a minimal raw keep-alive client (cheap enough to simulate
a thousand workers from one process) and the same interface over httpx. Every request names its bearer
token, since registration and heartbeats use different credentials."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams (JSON bodies, Content-Length responses)."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port = host, port
        self.size = connections
        self.idle: asyncio.Queue[tuple[Any, Any] | None] = asyncio.Queue()
        for _ in range(connections):
            self.idle.put_nowait(None)  # opened lazily

    async def request(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        conn = await self.idle.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            data = json.dumps(body).encode() if body is not None else b""
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            writer.write(head.encode() + data)
            await writer.drain()
            raw_head = await reader.readuntil(b"\r\n\r\n")
            status = int(raw_head.split(b" ", 2)[1])
            length = 0
            for line in raw_head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await reader.readexactly(length) if length else b""
            result = (status, json.loads(payload) if payload else None)
        except BaseException:
            if conn is not None:
                conn[1].close()
            self.idle.put_nowait(None)
            raise
        self.idle.put_nowait(conn)
        return result

    async def close(self) -> None:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn is not None:
                conn[1].close()


class HttpxCaller:
    """The same calls through an httpx.AsyncClient (the real workers' client)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def request(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        r = await self.client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
        return r.status_code, (r.json() if r.content else None)

    async def close(self) -> None:
        return None

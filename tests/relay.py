"""A TCP relay that makes a local server look down, or its links silent, to its clients."""

from __future__ import annotations

import asyncio
import threading


class TcpRelay:
    """A TCP relay on 127.0.0.1 to a local server, whose links can freeze.

    Entered, it accepts connections and relays them; left, it aborts every link and
    stops listening, so the server looks down (refused) to its clients while it runs.
    ``freeze`` makes the open links a path gone silent: no FIN, no RST.
    """

    def __init__(self, port: int, target_port: int) -> None:
        self._port, self._target_port = port, target_port
        self._frozen: set[int] = set()
        self._links = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> TcpRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._link, "127.0.0.1", self._port), self._loop
        ).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def freeze(self) -> None:
        """Silence every open link for good; new links work."""
        self._loop.call_soon_threadsafe(lambda: self._frozen.update(range(1, self._links + 1)))

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links += 1
        link = self._links
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self._target_port
        )
        self._writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if link not in self._frozen:
                        sink.write(data)
                        await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def _close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.gather(*handlers)

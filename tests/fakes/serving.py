"""Serve a raw ASGI app with uvicorn in a background thread on 127.0.0.1, for the fakes' runners."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import uvicorn

App = TypeVar("App", bound=Callable[..., Any])  # an ASGI app


@dataclass
class Served(Generic[App]):
    """A running server: the app it serves, its port, the uvicorn Server and the thread running it.

    The fakes' `Running…` handles subclass it, adding their own URLs.
    """

    app: App
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve_in_thread(
    app: App,
    name: str,
    startup_timeout_s: float = 10.0,
    *,
    what: str | None = None,
    on_stop: Callable[[], None] | None = None,
) -> Iterator[Served[App]]:
    """Serve `app` with uvicorn in a background thread on a free 127.0.0.1 port; stop it on exit.

    The socket is bound here and handed to uvicorn, so there is no pick-a-port race. The thread is
    named `{name}-{port}`; a failed start raises "{what} failed to start" (`what` defaults to `name`);
    `on_stop`, if given, is called first on exit, before the server is told to stop.
    """
    # With IPPROTO_TCP named, asyncio sets TCP_NODELAY on accepted connections.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        log_level="warning",
        lifespan="off",
        ws="none",
        access_log=False,
        interface="asgi3",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"{name}-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{what or name} failed to start")
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=startup_timeout_s):
            pass
        yield Served(app=app, port=port, server=server, thread=thread)
    finally:
        if on_stop is not None:
            on_stop()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

"""HTTP admission gate: every request runs under exactly one merge version.

The gate sits in front of the API server's routes as a pure ASGI middleware. A
request is *admitted* under the version in effect at that moment, which it reports
in the ``x-merge-version`` response header, and it holds a ticket until its
response is fully sent. A swap *closes* the gate: new requests wait at the door
(nothing of theirs reaches the engine), and the swap proceeds only once every
admitted request has finished (``drain=True``) or has been aborted
(``drain=False``). So a response is produced by the weights of exactly the version
named in its header.

An aborted request sees a clear error instead of the rest of its response: a 503
JSON body if nothing was sent yet, otherwise a final server-sent event
``data: {"error": ...}`` followed by ``data: [DONE]`` (vLLM's own stream error
format). Inside the app the abort looks like a client disconnect, so vLLM cancels
the request and aborts it in the engine through its ordinary path.

No vLLM import here: this module is plain asyncio + ASGI.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

VERSION_HEADER = "x-merge-version"

#: POST paths that never run the model: they pass the gate without a ticket.
UNGATED_PATHS = frozenset({
    "/v1/merge",
    "/tokenize",
    "/detokenize",
    "/pause",
    "/resume",
    "/is_paused",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/reset_encoder_cache",
})

#: Seconds an aborted request's handler gets to stop by itself before it is cancelled.
ABORT_GRACE = 5.0


class Ticket:
    """One admitted request: the version it runs under, and how to abort it."""

    __slots__ = ("version", "aborted", "reason", "_event", "task")

    def __init__(self, version: int):
        self.version = version
        self.aborted = False
        self.reason = ""
        self._event = asyncio.Event()
        self.task: asyncio.Task | None = None

    def abort(self, reason: str) -> None:
        if self.aborted:
            return
        self.aborted = True
        self.reason = reason
        self._event.set()
        task = self.task
        if task is not None and not task.done():
            asyncio.get_running_loop().call_later(ABORT_GRACE, task.cancel)

    async def wait_aborted(self) -> None:
        await self._event.wait()


class AdmissionGate:
    """Admits requests under one version at a time; closes for swaps."""

    def __init__(self, version: int = 0):
        self.version = version
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tickets: set[Ticket] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tickets)

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def admit(self) -> Ticket:
        while not self._open.is_set():
            await self._open.wait()
        ticket = Ticket(self.version)
        self._tickets.add(ticket)
        self._idle.clear()
        return ticket

    def release(self, ticket: Ticket) -> None:
        self._tickets.discard(ticket)
        if not self._tickets:
            self._idle.set()

    @asynccontextmanager
    async def closed(self, *, drain: bool, timeout: float | None, reason: str):
        """Close the gate; yield once no admitted request is left; reopen on exit.

        ``drain=True`` waits for admitted requests to finish; ``drain=False`` aborts
        them with ``reason``. Raises ``TimeoutError`` (gate reopened, nothing
        changed) if they are not gone within ``timeout`` seconds.
        """
        self._open.clear()
        try:
            if not drain:
                for ticket in list(self._tickets):
                    ticket.abort(reason)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"{self.in_flight} in-flight request(s) did not finish within {timeout:g} s"
                ) from None
            yield
        finally:
            self._open.set()


def _error_body(message: str, code: int = 503) -> dict:
    return {"error": {"message": message, "type": "ServiceUnavailableError", "param": None, "code": code}}


class MergeVersionMiddleware:
    """Pure ASGI middleware: admission through ``gate``, version header, aborts."""

    def __init__(self, app, gate: AdmissionGate, ungated=UNGATED_PATHS):
        self.app = app
        self.gate = gate
        self.ungated = frozenset(ungated)

    def _gated(self, scope) -> bool:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return False
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        return path not in self.ungated

    async def __call__(self, scope, receive, send):
        if not self._gated(scope):
            await self.app(scope, receive, send)
            return
        ticket = await self.gate.admit()
        try:
            await self._run(ticket, scope, receive, send)
        finally:
            self.gate.release(ticket)

    async def _run(self, ticket: Ticket, scope, receive, send):
        header = (VERSION_HEADER.encode(), str(ticket.version).encode())
        sent = {"started": False, "finished": False}
        pending_receive: list[asyncio.Future] = []

        async def guarded_send(message):
            if ticket.aborted:
                raise OSError(f"request aborted: {ticket.reason}")
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), header]
                sent["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["finished"] = True
            await send(message)

        async def guarded_receive():
            # An abort looks like a client disconnect to the app (vLLM then cancels
            # the handler and aborts the engine request itself).
            if ticket.aborted:
                return {"type": "http.disconnect"}
            if not pending_receive:
                pending_receive.append(asyncio.ensure_future(receive()))
            aborted = asyncio.ensure_future(ticket.wait_aborted())
            try:
                await asyncio.wait({pending_receive[0], aborted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                aborted.cancel()
            if pending_receive[0].done():
                return pending_receive.pop().result()
            return {"type": "http.disconnect"}

        app_task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        ticket.task = app_task
        try:
            await asyncio.wait({app_task})
        except asyncio.CancelledError:  # the server cancels us: take the app with us
            app_task.cancel()
            raise
        finally:
            for future in pending_receive:
                future.cancel()
        if not ticket.aborted:
            app_task.result()  # re-raise the app's own error, if any
        elif not app_task.cancelled():
            app_task.exception()  # expected (our disconnect): mark it retrieved
        if ticket.aborted and not sent["finished"]:
            await self._send_abort(ticket, sent["started"], send)

    @staticmethod
    async def _send_abort(ticket: Ticket, started: bool, send):
        message = f"request aborted: {ticket.reason}"
        body = json.dumps(_error_body(message)).encode()
        try:
            if not started:
                await send({
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (VERSION_HEADER.encode(), str(ticket.version).encode()),
                    ],
                })
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                event = b"data: " + body + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": False})
        except OSError:
            pass  # the client is gone too

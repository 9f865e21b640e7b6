"""The HTTP connection protocol the server runs under uvicorn: its h11 protocol, plus a deadline for each request's
headers. uvicorn closes an idle keep-alive connection only after a response; a connection that never sends a request,
or stalls halfway through its headers, would be held forever (each one a socket and a slot of the event loop). Here
a connection must start a request within `HEADER_TIMEOUT` seconds of opening and of each response; the body has the
app's own deadline (api.Limits.read_timeout)."""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0


class DeadlineH11Protocol(H11Protocol):
    _requests = 0  # requests started on this connection

    def _arm(self) -> None:
        seen = self._requests
        self.loop.call_later(HEADER_TIMEOUT, self._expire, seen)

    def _expire(self, seen: int) -> None:
        if self._requests == seen and not self.transport.is_closing():  # no request started since: hang up
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:
            self._requests += 1

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

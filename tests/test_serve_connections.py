"""qcjax.serve.connections: a connection that never starts a request, or stalls inside its headers, is closed after
the header deadline; one that sends its request gets its answer (a trivial ASGI app under uvicorn on 127.0.0.1)."""
import socket

import pytest

from conftest import serving

pytest.importorskip("uvicorn")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False


def test_idle_and_stalled_connections_are_closed_and_requests_answered(monkeypatch):
    from qcjax.serve import connections

    monkeypatch.setattr(connections, "HEADER_TIMEOUT", 0.5)
    with serving(app, http=connections.DeadlineH11Protocol) as port:
        addr = ("127.0.0.1", port)
        idle = socket.create_connection(addr)
        stalled = socket.create_connection(addr)
        stalled.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        ok = socket.create_connection(addr)
        ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):  # the whole response (it may come in several pieces)
            piece = ok.recv(1024)
            assert piece, answer
            answer += piece
        assert answer.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
        assert closed_within(idle, 5) and closed_within(stalled, 5)
        assert closed_within(ok, 5)  # after its response it has the same deadline to send the next request

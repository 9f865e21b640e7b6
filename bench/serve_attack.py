"""A small hostile-request load test of the completion server (127.0.0.1 only, bounded in count and time): does the
server stay responsive and whole under requests built to stall or break it?

    python bench/serve_attack.py                 # the tiny stand-in model (tools/stand_in.py), about a minute

It starts `python -m qcjax.serve` on the stand-in in its own process (with an API key, as an exposed server would
run), measures /health latency alone, then runs every attack below on threads while a poller times /health every
50 ms, and reports per attack the requests tried and the status codes seen; then /health latency p50 / p99 during the
attacks against alone, the server's RSS before and after, and compiles after warm-up.

Attacks: a 200,000-item prompt list; a body announced at 9 MiB; a lone surrogate in a prompt and in a chat message;
a request that can never fit the context; streaming clients that drop together mid-stream; half-open clients that
send part of a request and stall; idle connections that send nothing. Valid requests run throughout.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-attack"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="times each attack is sent (default 3)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: bytes, headers: dict | None = None, timeout: float = 120) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                                          **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    a = parse_args(argv)
    work = tempfile.mkdtemp(prefix="qcjax-attack-")
    model = os.path.join(work, "stand-in")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "stand_in.py"), model], check=True,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    port = a.port or _free_port()
    server = subprocess.Popen([sys.executable, "-m", "qcjax.serve", "--hf_dir", model, "--port", str(port),
                               "--max_len", "512", "--max_batch", "4", "--prefill_batch", "1", "--api_key", KEY,
                               "--log_level", "warning"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              stderr=subprocess.PIPE, text=True)

    def health() -> tuple[float, dict]:
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return time.perf_counter() - t, body

    deadline = time.time() + 600
    while True:
        try:
            health()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                print(server.stderr.read()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
    alone = [health()[0] for _ in range(40)]
    rss0 = _rss_mb(server.pid)
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stop = threading.Event()
    during = []

    def poll():
        while not stop.is_set():
            during.append(health()[0])
            time.sleep(0.05)

    ok = json.dumps({"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}).encode()

    def attack(name: str, fn) -> None:
        def one(_):
            try:
                return fn()
            except OSError as e:
                return type(e).__name__

        with concurrent.futures.ThreadPoolExecutor(a.rounds) as rounds:  # the rounds of one attack together
            for answer in rounds.map(one, range(a.rounds)):
                codes[name][answer] += 1

    def stream_drop() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x = 1", "max_tokens": 200, "stream": True,
                                                             "temperature": 0.7}).encode(),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        r.fp.readline()  # the first event, then hang up
        conn.sock.close()
        return r.status

    def half_open() -> str:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n{{\"prompt\": ").encode())
        t = time.perf_counter()
        data = s.recv(4096)  # the server's answer (a 408) or its close, whichever comes
        s.close()
        return f"{data.split(b' ')[1].decode() if data else 'closed'} after {time.perf_counter() - t:.0f} s"

    def idle() -> str:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        t = time.perf_counter()
        try:
            data = s.recv(1)
        except socket.timeout:
            return "still open after 20 s"
        finally:
            s.close()
        return f"{'closed' if not data else 'data'} after {time.perf_counter() - t:.0f} s"

    attacks = {
        "200,000-item prompt list": lambda: _post(port, "/v1/completions", json.dumps(
            {"prompt": ["def f():"] * 200_000, "max_tokens": 1}).encode()),
        "body announced at 9 MiB": lambda: _announce(port, 9 << 20),
        "lone surrogate in a prompt": lambda: _post(port, "/v1/completions", b'{"prompt": "a\\ud800"}'),
        "lone surrogate in a chat message": lambda: _post(port, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "\udfff"}]}).encode()),
        "a request that can never fit": lambda: _post(port, "/v1/completions", json.dumps(
            {"prompt": "x", "max_tokens": 100_000}).encode()),
        "4 streams dropped together": lambda: max(concurrent.futures.ThreadPoolExecutor(4).map(
            lambda _: stream_drop(), range(4))),
        "half-open request (stalls mid-body)": half_open,
        "idle connection (sends nothing)": idle,
        "valid requests meanwhile": lambda: _post(port, "/v1/completions", ok),
    }
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(attacks)) as pool:
        list(pool.map(lambda kv: attack(*kv), attacks.items()))
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    _, h = health()
    rss1 = _rss_mb(server.pid)
    server.send_signal(signal.SIGINT)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, {os.cpu_count()} cores; "
          f"{a.rounds} rounds of each attack, {wall:.0f} s")
    print("| attack | tried | answers |\n|---|---|---|")
    for name, c in codes.items():
        print(f"| {name} | {sum(c.values())} | {', '.join(f'{k}: {v}' for k, v in sorted(c.items(), key=str))} |")
    print(f"\n/health latency alone p50 {1e3 * statistics.median(alone):.1f} ms p99 {1e3 * q(alone, 0.99):.1f} ms; "
          f"during the attacks p50 {1e3 * statistics.median(during):.1f} ms p99 {1e3 * q(during, 0.99):.1f} ms "
          f"({len(during)} polls); RSS {rss0:.0f} MB before, {rss1:.0f} MB after; compiles after warm-up "
          f"{h['compiles_after_warmup']}; requests in flight after {h['busy']}, pages held {h['pages_used']}")
    return 0


def _announce(port: int, size: int) -> int:
    """Headers announcing `size` bytes, and no body: refused before a byte of it is read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    for k, v in {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                 "Content-Length": str(size)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


if __name__ == "__main__":
    sys.exit(main())

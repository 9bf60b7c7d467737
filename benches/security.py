#!/usr/bin/env python3
"""What a client without a key can cost a keyed `lm-sandbox serve` (the figures of the README's
security section). Usage: benches/security.py BINARY MODEL. Starts the server on a free port with
one key, then, each phase on its own:
  1. 1,000 websocket upgrades to an SDK path that never send a first message (held open);
  2. 16 first messages of 16 MiB each, streamed as one websocket frame apiece;
  3. 300 connections sending `POST /v1/models/load` heads with `Content-Length: 100` and no body,
     reconnecting at once, while a keyed client asks `GET /v1/models` 200 times;
and prints the server's RSS before, its peak (VmHWM) after each phase, and the keyed client's
latency percentiles during the flood."""
import base64
import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time

binary, model = sys.argv[1], sys.argv[2]
KEY = "sk-bench"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen(
    [binary, "serve", "-m", model, "--port", str(port), "-t", "2", "--api-key", KEY],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def mib(field):
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024


def upgrade():
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /llm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n"
               f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n")
              .encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            return s, head
        head += chunk
    return s, head


def ready():
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not come up")


try:
    ready()
    print(f"server RSS before: {mib('VmRSS:'):.0f} MiB")

    # 1. Held upgrades.
    held, upgraded = [], 0
    for _ in range(1000):
        s, head = upgrade()
        held.append(s)
        upgraded += head.startswith(b"HTTP/1.1 101")
    time.sleep(3)
    open_now = 0
    for s in held:
        s.setblocking(False)
        try:
            # Closed: the end of the stream, or a websocket close frame (0x88).
            data = s.recv(4096)
            open_now += data != b"" and data[0] != 0x88
        except BlockingIOError:
            open_now += 1
        except OSError:
            pass
    print(f"1,000 held websockets: {upgraded} upgraded, {open_now} still open after 3 s; "
          f"peak RSS {mib('VmHWM:'):.0f} MiB")
    for s in held:
        s.close()

    # 2. Oversized first messages, one frame each, streamed.
    def flood_message(sent):
        s, _ = upgrade()
        s.sendall(bytes([0x81, 0xFF]) + struct.pack(">Q", 16 << 20) + b"\0\0\0\0")
        chunk = b"x" * (64 << 10)
        n = 0
        try:
            while n < 16 << 20:
                s.sendall(chunk)
                n += len(chunk)
        except OSError:
            pass
        sent.append(n)
        s.close()
    sent = []
    threads = [threading.Thread(target=flood_message, args=(sent,)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"16 x 16 MiB first messages: each closed after at most {max(sent) >> 10} KiB were "
          f"written (kernel buffers included); "
          f"peak RSS {mib('VmHWM:'):.0f} MiB")

    # 3. Slow bodies without a key, while a keyed client is served.
    stop = threading.Event()
    refused = [0]
    head = (b"POST /v1/models/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")

    def slow_body():
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(head)
                answer = s.recv(64)
                refused[0] += answer.startswith(b"HTTP/1.1 401")
                s.close()
            except OSError:
                pass
    attackers = [threading.Thread(target=slow_body, daemon=True) for _ in range(300)]
    for t in attackers:
        t.start()
    time.sleep(1)
    latencies, statuses = [], {}
    for _ in range(200):
        started = time.monotonic()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        status = c.getresponse().status
        latencies.append(time.monotonic() - started)
        statuses[status] = statuses.get(status, 0) + 1
        c.close()
    stop.set()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e3
    p99 = latencies[len(latencies) * 99 // 100 - 1] * 1e3
    print(f"300-connection slow-body flood ({refused[0]} refused with 401): keyed GET /v1/models "
          f"statuses {statuses}, p50 {p50:.1f} ms, p99 {p99:.1f} ms; peak RSS {mib('VmHWM:'):.0f} MiB")
finally:
    server.terminate()
    server.wait(timeout=30)

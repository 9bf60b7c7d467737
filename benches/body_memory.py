#!/usr/bin/env python3
"""Peak RSS of `lm-sandbox serve` under N concurrent 16 MiB request bodies (the README's memory
ceiling figure). Usage: benches/body_memory.py BINARY MODEL [N]. Starts the server on a free port,
sends N bodies at once (a small chat request padded with one 16 MiB string field, which the server
must read and parse), and prints the server's RSS before and its peak (VmHWM) after."""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

binary, model = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen(
    [binary, "serve", "-m", model, "--port", str(port), "-t", "2", "--max-queue", "128"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def status(field):
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) // 1024


try:
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    before = status("VmRSS")
    pad = "x" * (16 * 1024 * 1024 - 200)
    body = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi"}], "padding": pad}).encode()
    codes = []

    def send():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        codes.append(c.getresponse().status)

    threads = [threading.Thread(target=send) for _ in range(n)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"bodies": n, "body_mib": len(body) / 2**20, "rss_before_mib": before,
                      "peak_rss_mib": status("VmHWM"), "seconds": round(time.time() - started, 1),
                      "statuses": {c: codes.count(c) for c in set(codes)}}))
finally:
    server.terminate()
    server.wait()

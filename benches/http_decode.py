#!/usr/bin/env python3
"""One streamed chat completion against an OpenAI-compatible server; prints decode tokens/s as the
client sees it (chunks after the first, over the time after the first), and time to first token.

Works against lm-sandbox and llama-server alike (both stream one token per chunk). EOS is banned with
logit_bias so every run decodes exactly --tokens tokens, like llama-bench -n.

Usage: http_decode.py HOST:PORT MODEL [--tokens 128] [--runs 3] [--ban-token ID ...]
"""
import argparse
import http.client
import json
import statistics
import time


def one_run(host, port, model, tokens, banned):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(t): -100 for t in banned},
    }
    conn = http.client.HTTPConnection(host, port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    stamps = []
    buf = b""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        choices = chunk.get("choices") or []
        if choices and choices[0].get("delta", {}).get("content"):
            stamps.append(time.perf_counter())
    conn.close()
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return len(stamps), ttft, decode


def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ban-token", type=int, action="append", default=[])
    a = p.parse_args()
    host, port = a.addr.rsplit(":", 1)
    one_run(host, int(port), a.model, 8, a.ban_token)  # warm-up
    results = [one_run(host, int(port), a.model, a.tokens, a.ban_token) for _ in range(a.runs)]
    print(json.dumps({
        "chunks": [r[0] for r in results],
        "ttft_s": statistics.median(r[1] for r in results),
        "decode_tok_s": statistics.median(r[2] for r in results),
    }))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Figures for the OpenAI-surface issue: `benches/surface.py BINARY MODEL [ROUNDS]`.

Starts `serve -t 2` on a free port and measures, interleaved A-B-A-B for ROUNDS rounds (default
3), with medians and spreads:
- embeddings/s at batch 1 (one input per request, sequential) and batch 32 (32 inputs per request);
- decode tokens/s of one greedy stream of 128 tokens with `top_logprobs: 5` against without (EOS
  banned with `logit_bias` so both decode exactly 128 tokens; the rate is llama-server's
  `timings.predicted_per_second`, which excludes the prompt).
"""
import http.client
import os
import json
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import start  # noqa: E402

binary, model = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
MODEL = "SmolLM2-135M-Instruct.Q4_1"
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
    ["cats", "rivers", "stocks", "music", "rockets", "bread", "chess", "rain"] * 4)]


def post(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    assert r.status == 200, data
    return data


def embeddings_per_second(port, batch, total=64):
    started = time.perf_counter()
    done = 0
    while done < total:
        post(port, "/v1/embeddings", {"model": MODEL, "input": SENTENCES[:batch]})
        done += batch
    return done / (time.perf_counter() - started)


def decode_rate(port, top_logprobs):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 128, "temperature": 0, "logit_bias": {"2": -100, "0": -100}}
    if top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=top_logprobs)
    data = post(port, "/v1/chat/completions", body)
    assert data["usage"]["completion_tokens"] == 128, data["usage"]
    if top_logprobs is not None:
        assert len(data["choices"][0]["logprobs"]["content"]) == 128
    return data["timings"]["predicted_per_second"]


proc, port = start(binary, model)
try:
    # Warm up: the embedding context is made on first use.
    embeddings_per_second(port, 1, total=2)
    decode_rate(port, None)
    rows = {"embeddings/s, batch 1": [], "embeddings/s, batch 32": [],
            "decode tok/s, no logprobs": [], "decode tok/s, top_logprobs 5": []}
    for _ in range(rounds):
        for _ in range(2):  # A-B-A-B within the round
            rows["embeddings/s, batch 1"].append(embeddings_per_second(port, 1))
            rows["embeddings/s, batch 32"].append(embeddings_per_second(port, 32))
            rows["decode tok/s, no logprobs"].append(decode_rate(port, None))
            rows["decode tok/s, top_logprobs 5"].append(decode_rate(port, 5))
    for name, values in rows.items():
        print(f"{name:32} median {statistics.median(values):8.1f}   "
              f"min {min(values):8.1f}   max {max(values):8.1f}   (n={len(values)})")
    a = statistics.median(rows["decode tok/s, top_logprobs 5"])
    b = statistics.median(rows["decode tok/s, no logprobs"])
    print(f"decode with top_logprobs 5 / without: {a / b:.3f}")
    e32 = statistics.median(rows["embeddings/s, batch 32"])
    e1 = statistics.median(rows["embeddings/s, batch 1"])
    print(f"embeddings batch 32 / batch 1: {e32 / e1:.2f}")
finally:
    proc.terminate()
    proc.wait()

#!/usr/bin/env python3
"""Load scenarios against an OpenAI-compatible server (lm-sandbox or llama-server), streaming,
temperature 0, EOS banned with logit_bias so every stream decodes exactly its max_tokens.

Prints one JSON object per scenario:
  single      1 stream, 128 tokens: decode tok/s (client side, chunks after the first), first token s
  multi       8 concurrent streams x 128 tokens: aggregate tok/s (all tokens / wall time)
  cold_long   a ~470-token prompt never seen before: first token s (median of 3 prompts)
  warm_long   the same prompt again: first token s (median of the same 3)
  multi_long  8 streams, distinct ~470-token prompts, 64 tokens each: aggregate tok/s, median first
              token s, and the running streams' decode rate while other prompts still prefill (per
              stream: tokens after its first, up to the last stream's first token, over that time;
              the median over the streams that had one)
  agent       4 conversations x 6 turns at once: a shared ~600-token system prompt, each turn adding
              the reply and a ~150-token tool result, 32 tokens per reply: median and p95 first token
              s over all turns, and the wall time
  agent_own   the same load with a distinct system prompt per conversation (a tag first): no server
              can share a prefix across conversations, so both compute the same tokens and the wall
              time compares how well each schedules them, apart from prefix reuse
  peak_rss    with --pid: the server process's peak resident memory (VmHWM) after all the above

Where the time goes, for the multi, multi_long, agent and agent_own loads: wall_s, and with --pid
cpu_s (the server's CPU time, all threads: the same tokens on the same kernels cost the same CPU
time, so a wall-time gap with equal CPU time is scheduling and a gap in both is work); and when the
server exports lmsandbox_engine_busy_seconds_total (lm-sandbox with --metrics), prefill_s and
decode_s (its engine's time in steps that held prompt tokens, and in steps that only decoded).

Usage: load.py HOST:PORT MODEL [--ban-token ID ...] [--scenario NAME ...] [--pid PID]
"""
import argparse
import http.client
import json
import os
import statistics
import threading
import time
import uuid

FILLER = (
    "The lighthouse stood on a rock at the edge of the cold northern sea, and every night its keeper "
    "climbed the spiral stairs to light the lamp, trim the wick, and watch the ships pass safely by. "
)


def long_prompt(tag):
    # ~470 tokens with SmolLM2's tokenizer: a unique tag first, so no server can reuse a cache.
    return f"[{tag}] Summarise this story.\n" + FILLER * 11


def stream(addr, model, content, max_tokens, banned, messages=None):
    host, port = addr.rsplit(":", 1)
    body = {
        "model": model,
        "messages": messages or [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(t): -100 for t in banned},
    }
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:300]}")
    stamps = []
    text = []
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
        choices = json.loads(data).get("choices") or []
        piece = choices[0].get("delta", {}).get("content") if choices else None
        if piece:
            stamps.append(time.perf_counter())
            text.append(piece)
    conn.close()
    return {"start": start, "stamps": stamps, "text": "".join(text)}


def at_once(work, n):
    """Runs work(0) … work(n - 1) on threads of their own; the wall time until all are done."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def concurrent(addr, model, contents, max_tokens, banned):
    results = [None] * len(contents)

    def run(i):
        results[i] = stream(addr, model, contents[i], max_tokens, banned)

    wall = at_once(run, len(contents))
    tokens = sum(len(r["stamps"]) for r in results)
    ttfts = [r["stamps"][0] - r["start"] for r in results]
    return tokens / wall, statistics.median(ttfts), tokens, results


def decode_during_prefill(results):
    """Median decode rate of the streams that were generating while others still prefilled."""
    last_first = max(r["stamps"][0] for r in results)
    rates = []
    for r in results:
        s = r["stamps"]
        during = [t for t in s[1:] if t <= last_first]
        if during and last_first > s[0]:
            rates.append(len(during) / (last_first - s[0]))
    return statistics.median(rates) if rates else 0.0


def agent(addr, model, banned, shared=True):
    """4 conversations x 6 turns at once; first-token times of every turn, and the wall time.
    `shared=False`: each conversation's system prompt starts with a tag of its own."""
    ttfts = []
    lock = threading.Lock()

    def conversation(i):
        tag = "" if shared else f"[{uuid.uuid4().hex[:8]}] "
        system = tag + "You are an agent with tools. " + FILLER * 13
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"[{uuid.uuid4().hex[:8]}] Task {i}: plan a trip."}]
        for turn in range(6):
            r = stream(addr, model, None, 32, banned, messages)
            with lock:
                ttfts.append(r["stamps"][0] - r["start"])
            messages.append({"role": "assistant", "content": r["text"]})
            messages.append({"role": "user", "content": f"Tool result {turn}: " + FILLER * 3})

    wall = at_once(conversation, 4)
    ttfts.sort()
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return {"median_ttft_s": statistics.median(ttfts), "p95_ttft_s": p95, "wall_s": wall}


def cpu_seconds(pid):
    """The process's CPU time so far (user + system, every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_busy(addr):
    """lm-sandbox's engine time by step kind ({"prefill": s, "decode": s}), or None when the
    server does not export it."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    if resp.status != 200:
        return None
    busy = {}
    for line in text.splitlines():
        if line.startswith("lmsandbox_engine_busy_seconds_total{"):
            labels, value = line.rsplit(" ", 1)
            step = labels.split('step="', 1)[1].split('"', 1)[0]
            busy[step] = busy.get(step, 0.0) + float(value)
    return busy or None


def profiled(addr, pid, load):
    """Runs load() (a dict of results) and adds where the time went: wall_s, cpu_s, and the
    engine's prefill_s and decode_s where the server exports them."""
    cpu0 = cpu_seconds(pid) if pid else None
    busy0 = engine_busy(addr)
    t0 = time.perf_counter()
    out = load()
    out.setdefault("wall_s", time.perf_counter() - t0)
    if pid:
        out["cpu_s"] = cpu_seconds(pid) - cpu0
    busy1 = engine_busy(addr)
    if busy0 and busy1:
        out["prefill_s"] = busy1["prefill"] - busy0["prefill"]
        out["decode_s"] = busy1["decode"] - busy0["decode"]
    return out


def peak_rss_mib(pid):
    """The process's peak resident set (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("model")
    p.add_argument("--ban-token", type=int, action="append", default=[])
    p.add_argument("--scenario", action="append")
    p.add_argument("--pid", type=int, help="the server's process, for its peak resident memory")
    a = p.parse_args()
    wanted = a.scenario or ["single", "multi", "cold_long", "warm_long", "multi_long", "agent",
                            "agent_own"]
    out = {}
    stream(a.addr, a.model, "Hello", 4, a.ban_token)  # warm-up
    if "single" in wanted:
        runs = []
        for _ in range(3):
            r = stream(a.addr, a.model, f"[{uuid.uuid4().hex[:8]}] Write a story.", 128, a.ban_token)
            s = r["stamps"]
            runs.append(((len(s) - 1) / (s[-1] - s[0]), s[0] - r["start"]))
        out["single"] = {"decode_tok_s": statistics.median(x[0] for x in runs),
                         "ttft_s": statistics.median(x[1] for x in runs)}
    if "multi" in wanted:
        def multi():
            contents = [f"[{uuid.uuid4().hex[:8]}] Write story number {i}." for i in range(8)]
            rate, ttft, tokens, _ = concurrent(a.addr, a.model, contents, 128, a.ban_token)
            return {"aggregate_tok_s": rate, "median_ttft_s": ttft, "tokens": tokens}
        out["multi"] = profiled(a.addr, a.pid, multi)
    if "cold_long" in wanted or "warm_long" in wanted:
        # Three prompts, each sent twice: the medians of the first and of the second sendings.
        cold, warm = [], []
        for _ in range(3):
            prompt = long_prompt(uuid.uuid4().hex[:8])
            for times in (cold, warm):
                r = stream(a.addr, a.model, prompt, 1, a.ban_token)
                times.append(r["stamps"][0] - r["start"])
        out["cold_long"] = {"ttft_s": statistics.median(cold)}
        out["warm_long"] = {"ttft_s": statistics.median(warm)}
    if "multi_long" in wanted:
        def multi_long():
            contents = [long_prompt(uuid.uuid4().hex[:8]) for _ in range(8)]
            rate, ttft, tokens, results = concurrent(a.addr, a.model, contents, 64, a.ban_token)
            return {"aggregate_tok_s": rate, "median_ttft_s": ttft, "tokens": tokens,
                    "decode_during_prefill_tok_s": decode_during_prefill(results)}
        out["multi_long"] = profiled(a.addr, a.pid, multi_long)
    if "agent" in wanted:
        out["agent"] = profiled(a.addr, a.pid, lambda: agent(a.addr, a.model, a.ban_token))
    if "agent_own" in wanted:
        out["agent_own"] = profiled(
            a.addr, a.pid, lambda: agent(a.addr, a.model, a.ban_token, shared=False))
    if a.pid:
        out["peak_rss"] = {"mib": peak_rss_mib(a.pid)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The cost of llama.cpp's RPC hop: decode tokens/s of the default model on the CPU alone, with
# every layer on one loopback `rpc-worker`, and split over two. Rounds alternate the three setups
# (A-B-C-A-B-C...) so the machine's drift hits each alike; prints each round and the medians.
#   benches/rpc_hop.sh [ROUNDS]   (default 3; builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
cargo build --release --quiet
bin=target/release/lm-sandbox
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
py=target/clients-venv/bin/python
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
worker() { # PORT MEM_MIB THREADS
  "$bin" rpc-worker --port "$1" --mem "$2" -t "$3" >/dev/null 2>&1 &
  pids+=($!)
}
serve() { # PORT THREADS FLAGS...
  local port=$1 threads=$2; shift 2
  "$bin" serve -m "$model" --port "$port" -t "$threads" -c 1024 --parallel 1 -b 64 "$@" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 120); do curl -sf "localhost:$port/health" >/dev/null && return; sleep 0.5; done
  echo "server on $port did not start" >&2; exit 1
}
# Two cores: the CPU run decodes on both; one worker decodes on both; two workers on one each.
worker 50071 400 2
worker 50072 90 1
worker 50073 70 1
sleep 1
serve 18101 2
serve 18102 2 --rpc 127.0.0.1:50071 --n-gpu-layers all
serve 18103 2 --rpc 127.0.0.1:50072 --rpc 127.0.0.1:50073 --n-gpu-layers all
"$py" - "$rounds" <<'PY'
import json, statistics, sys, time, urllib.request
rounds = int(sys.argv[1])
setups = [("cpu alone", 18101), ("one worker", 18102), ("two workers", 18103)]
def decode_rate(port):
    body = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1", "stream": True, "max_tokens": 128,
                       "temperature": 0, "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"content-type": "application/json"})
    stamps = []
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"content"' in line:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
for _, port in setups:  # warm-up
    decode_rate(port)
rates = {name: [] for name, _ in setups}
for r in range(rounds):
    for name, port in setups:
        rates[name].append(decode_rate(port))
    print("round", r + 1, "  ".join(f"{n}: {rates[n][-1]:.1f}" for n, _ in setups))
base = statistics.median(rates["cpu alone"])
print("\nsetup          median tok/s   vs cpu alone")
for name, _ in setups:
    m = statistics.median(rates[name])
    print(f"{name:<14} {m:>12.1f}   {m / base:>11.2f}")
PY

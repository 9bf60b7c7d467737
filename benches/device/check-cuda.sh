#!/usr/bin/env bash
# The H100 check of lm-sandbox's own CUDA build (issue 5). Prepared here by prepare-cuda.sh.
#   call 1: carry target/device/bin and target/device/part-a, run `true`
#   call 2: carry target/device/part-b, run `bash benches/device/check-cuda.sh`
# Prints the inventory, the plan, llama.cpp's own fit beside it, the memory NVML measures after
# loading against the plan, and decode tokens/s on the GPU and (same machine) on its CPU.
set -u
cd target/device
cat part-a/model.part-aa part-b/model.part-ab > model.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  model.gguf" | sha256sum -c || exit 1
[ -x lm-sandbox ] || xz -dc bin/lm-sandbox.xz > lm-sandbox && chmod +x lm-sandbox
# The carried C++ runtime only if the system's is too old for the binary.
./lm-sandbox --version >/dev/null 2>&1 || export LD_LIBRARY_PATH=$PWD/bin/libs
# The device's own cuBLAS, which the binary's cuBLAS calls are forwarded to.
cublas=$(ls /usr/local/cuda/lib64/libcublas.so.* /usr/local/cuda*/targets/x86_64-linux/lib/libcublas.so.* \
  /usr/lib/x86_64-linux-gnu/libcublas.so.* 2>/dev/null | head -1)
echo "cuBLAS: ${cublas:-none found}; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
[ -n "$cublas" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$(dirname "$cublas")"
nvidia-smi --query-gpu=name,pci.bus_id,memory.total,memory.used,memory.free,compute_cap,driver_version --format=csv
./lm-sandbox --version
./lm-sandbox gpus
./lm-sandbox plan -m model.gguf -c 8192 --parallel 4
./lm-sandbox plan -m model.gguf -c 8192 --parallel 4 --json > "$OUT/plan.json"

port=18555
serve() {  # serve LOG [flags...]
  local log=$1; shift
  NO_COLOR=1 RUST_LOG=info ./lm-sandbox serve -m model.gguf -c 8192 --parallel 4 --port $port "$@" > "$OUT/$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do curl -sf localhost:$port/health >/dev/null && return 0; sleep 0.5; done
  echo "server did not come up"; tail -20 "$OUT/$log"; return 1
}
decode() {  # one 256-token greedy completion, end-of-text banned; prints tokens/s
  curl -s localhost:$port/v1/completions -H 'content-type: application/json' \
    -d '{"model":"model","prompt":"Once upon a time","max_tokens":256,"temperature":0,"logit_bias":{"0":-100,"2":-100}}' \
    | python3 -c 'import json,sys; t=json.load(sys.stdin)["timings"]; print(round(t["predicted_per_second"],1), t["predicted_n"])'
}

serve serve-gpu.log && {
  sleep 3   # one NVML poll after loading
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv
  curl -s localhost:$port/v1/placement > "$OUT/placement.json"
  python3 -c 'import json; p=json.load(open("'"$OUT"'/placement.json")); print("measured", p["measured"])'
  decode >/dev/null; echo "GPU decode tok/s (3 runs):"; decode; decode; decode
  kill $pid; wait $pid 2>/dev/null
}
sed 's/\x1b\[[0-9;]*m//g' "$OUT/serve-gpu.log" | grep -E "plan vs|own fit|reproduces|GPU memory after|offload|buffer size|fit|CUDA|cublas|error" | cut -c1-300 | head -60

# Four sequences at once on the GPU: aggregate decode tokens/s.
serve serve-gpu4.log && {
  start=$(date +%s.%N)
  jobs_=()
  for _ in 1 2 3 4; do decode > /dev/null & jobs_+=($!); done
  wait "${jobs_[@]}"
  python3 -c "print('GPU aggregate decode tok/s, 4 x 256 tokens at once:', round(1024 / ($(date +%s.%N) - $start), 1))"
  kill $pid; wait $pid 2>/dev/null
}
# The same load with CUDA 11.8's default eager module loading, for the runtime's share.
CUDA_MODULE_LOADING=EAGER serve serve-eager.log && {
  sleep 3
  curl -s localhost:$port/v1/placement | python3 -c 'import json,sys; print("eager module loading: measured", json.load(sys.stdin)["measured"])'
  kill $pid; wait $pid 2>/dev/null
}
grep -E "CUDA error|driver shutting down" "$OUT"/serve-*.log && echo "CUDA errors above" || echo "no CUDA errors at shutdown"

serve serve-cpu.log --n-gpu-layers 0 -t 16 && {
  decode >/dev/null; echo "CPU decode tok/s, same machine (3 runs):"; decode; decode; decode
  kill $pid; wait $pid 2>/dev/null
}

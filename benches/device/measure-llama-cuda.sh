#!/usr/bin/env bash
# Call 2, on the same warm machine, carries model.part-ab and runs this.
# Device step 2 (issue 5): the default model fully offloaded by llama.cpp on the H100 with the plan's
# settings (-c 8192, 4 sequences): buffer sizes llama.cpp reports, nvidia-smi's used memory, and GPU
# decode speed.
cd "$(dirname "$0")"
cat model.part-aa model.part-ab > model.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  model.gguf" | sha256sum -c
nvidia-smi --query-gpu=memory.used,memory.free --format=csv
./build/bin/llama-server -m model.gguf -ngl 99 -c 8192 -np 4 -fa off --port 18555 > server.log 2>&1 &
pid=$!
for i in $(seq 1 60); do curl -sf localhost:18555/health >/dev/null && break; sleep 0.5; done
nvidia-smi --query-gpu=memory.used,memory.free --format=csv
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
grep -E "buffer size|KV self size|compute buffer|model buffer|CUDA0|offload" server.log | head -30
kill $pid; wait $pid 2>/dev/null
./build/bin/llama-bench -m model.gguf -ngl 99 -p 512 -n 128 -r 3 2>&1 | tail -5
cp server.log "$OUT/llama-server-h100.log"

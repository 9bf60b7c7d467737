#!/usr/bin/env bash
# Prepare here: mkdir -p target/device && cp target/debug/lm-sandbox target/device/ && strip target/device/lm-sandbox
#               && cp -L /lib/x86_64-linux-gnu/libgomp.so.1 target/device/ && cp benches/device/check-inventory.sh target/device/check.sh
# Run on the device carrying target/device: bash target/device/check.sh
# Device check for issue 5: the NVML inventory as lm-sandbox reads it, beside nvidia-smi's view.
set -x
nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total,memory.free,memory.used,compute_cap,utilization.gpu,display_active --format=csv
ldd --version | head -1
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD
./lm-sandbox --version
./lm-sandbox gpus
./lm-sandbox gpus --json | tee "$OUT/h100-inventory.json"
CUDA_VISIBLE_DEVICES="" ./lm-sandbox gpus   # NVML ignores CUDA_VISIBLE_DEVICES: still listed

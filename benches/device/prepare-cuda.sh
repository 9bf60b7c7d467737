#!/usr/bin/env bash
# Prepares, here, what the H100 check of lm-sandbox's own CUDA build needs (issue 5), in
# target/device/: the release binary built against Debian's CUDA 11.8 for sm_90, stripped and
# xz-compressed (27 MB); the C++ runtime libraries it links dynamically, in case the device's are
# older; the default model in two parts. A run carries at most 64 MiB, so the check takes two calls
# on the same warm machine (see check-cuda.sh).
#
# cuBLAS: linked statically it adds about 450 MB even pruned to sm_90, so for this check only its
# twelve entry points are forwarded to the device's own libcublas (cublas-forward.c), built here as
# a stand-in libcublas_static.a. The owner's build links the real one (.ci/build-cuda).
#
#   benches/device/prepare-cuda.sh     # about 25 minutes cold on 2 cores (GGML_CUDA_FA=OFF)
set -euo pipefail
cd "$(dirname "$0")/../.."
.ci/build-cuda --toolkit-only
libs=target/cuda-libs-forward/lib64
if [ ! -e "$libs/libcublas_static.a" ]; then
  mkdir -p "$libs"
  m=$(dirname "$(find /usr/lib /usr/local/cuda*/lib64 -name libcudart_static.a 2>/dev/null | head -1)")
  ln -sf "$m/libcudart_static.a" "$m/libculibos.a" "$m/libcuda.so" "$libs/"
  gcc -O2 -fPIC -Wall -c benches/device/cublas-forward.c -o "$libs/cublas-forward.o"
  ar rcs "$libs/libcublas_static.a" "$libs/cublas-forward.o"
  ar rcs "$libs/libcublasLt_static.a"
fi
# GGML_CUDA_FA=OFF: compiles the flash-attention kernels empty (about half the CUDA compile time);
# llama.cpp's "auto" flash attention is then off on the GPU. The shim supplies two Hopper device
# functions CUDA 11.8 lacks (see the file). llama-cpp-sys-2 bundles the CUDA archives into its rlib,
# so the stand-in must exist before the first build of this target dir.
CUDA_LIBRARY_PATH="$PWD/target/cuda-libs-forward" CMAKE_CUDA_ARCHITECTURES=90 \
CMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-11 GGML_CUDA_FA=OFF \
CMAKE_CUDA_FLAGS="-include $PWD/benches/device/cuda118-pdl-shim.cuh" \
  cargo build --release --features cuda --target-dir target/cuda-sm90
out=target/device
rm -rf "$out" && mkdir -p "$out/bin/libs" "$out/part-a" "$out/part-b"
strip -o "$out/bin/lm-sandbox" target/cuda-sm90/release/lm-sandbox
xz -T2 -6 "$out/bin/lm-sandbox"
for lib in libstdc++.so.6 libgomp.so.1 libgcc_s.so.1; do
  cp -L "/lib/x86_64-linux-gnu/$lib" "$out/bin/libs/"
done
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 34000000 "$model" > "$out/part-a/model.part-aa"
tail -c +34000001 "$model" > "$out/part-b/model.part-ab"
du -sb "$out"/*   # call 1 carries bin + part-a, call 2 part-b: each under 64 MiB

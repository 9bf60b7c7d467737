#!/usr/bin/env bash
# Prepares, here, what the H100 check of lm-sandbox's own CUDA build needs (issue 5), in
# target/device/: the release binary built against Debian's CUDA 11.8 for sm_90 (cuBLAS pruned to
# sm_90 with nvprune so the binary is smaller), xz-compressed; the C++ runtime libraries it links
# dynamically; the default model split in two (a run carries at most 64 MiB, so the model travels
# over two calls on the same warm machine).
#
#   benches/device/prepare-cuda.sh     # builds target/cuda-sm90 first (about 30 minutes cold)
set -euo pipefail
cd "$(dirname "$0")/../.."
libs=target/cuda-libs-sm90/lib64
if [ ! -e "$libs/libcublasLt_static.a" ]; then
  mkdir -p "$libs"
  m=$(dirname "$(find /usr/lib /usr/local/cuda*/lib64 -name libcudart_static.a 2>/dev/null | head -1)")
  ln -sf "$m/libcudart_static.a" "$m/libculibos.a" "$m/libcuda.so" "$libs/"
  nvprune -gencode arch=compute_90,code=sm_90 "$m/libcublas_static.a" -o "$libs/libcublas_static.a"
  nvprune -gencode arch=compute_90,code=sm_90 "$m/libcublasLt_static.a" -o "$libs/libcublasLt_static.a"
fi
# GGML_CUDA_FA=OFF: the flash-attention kernels are most of the CUDA compile time; without them
# llama.cpp's "auto" flash attention is off on the GPU. The shim supplies two Hopper device
# functions CUDA 11.8 lacks (see the file).
CUDA_LIBRARY_PATH="$PWD/target/cuda-libs-sm90" CMAKE_CUDA_ARCHITECTURES=90 \
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
split -b 50000000 models/SmolLM2-135M-Instruct.Q4_1.gguf "$out/model.part-"
mv "$out/model.part-aa" "$out/part-a/" && mv "$out/model.part-ab" "$out/part-b/"
du -sh "$out"/*

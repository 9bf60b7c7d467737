// For the H100 check only (issue 5): stands in for CUDA 11.8's libcublas_static.a /
// libcublasLt_static.a (about 450 MB of sm_90 kernels and host code once linked, far over what a
// device run can carry) by forwarding the twelve cuBLAS calls ggml-cuda makes to the device's own
// libcublas.so (CUDA 13 there), found with dlopen at first use. The cuBLAS v2 API these use is
// unchanged from 11.8 to 13. The owner's build links cuBLAS statically as usual (.ci/build-cuda).
#include <cublas_v2.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

static void *cublas_library(void) {
    static void *lib;
    if (!lib) {
        const char *names[] = {getenv("LM_SANDBOX_CUBLAS"), "libcublas.so.13", "libcublas.so.12",
                               "libcublas.so.11", "libcublas.so"};
        for (unsigned i = 0; i < sizeof names / sizeof *names && !lib; i++) {
            if (names[i]) lib = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
        }
        if (!lib) {
            fprintf(stderr, "cublas-forward: no libcublas.so found: %s\n", dlerror());
            abort();
        }
    }
    return lib;
}

static void *cublas_symbol(const char *name, const char *fallback) {
    void *sym = dlsym(cublas_library(), name);
    if (!sym && fallback) sym = dlsym(cublas_library(), fallback);
    if (!sym) {
        fprintf(stderr, "cublas-forward: libcublas lacks %s\n", name);
        abort();
    }
    return sym;
}

#define FORWARD(name, fallback, params, args)                                    \
    cublasStatus_t CUBLASWINAPI name params {                                    \
        static cublasStatus_t (*fn) params;                                      \
        if (!fn) fn = (cublasStatus_t(*) params)cublas_symbol(#name, fallback);  \
        return fn args;                                                          \
    }

FORWARD(cublasCreate_v2, "cublasCreate", (cublasHandle_t *handle), (handle))
FORWARD(cublasDestroy_v2, "cublasDestroy", (cublasHandle_t handle), (handle))
FORWARD(cublasSetStream_v2, "cublasSetStream", (cublasHandle_t handle, cudaStream_t stream),
        (handle, stream))
FORWARD(cublasSetWorkspace_v2, "cublasSetWorkspace",
        (cublasHandle_t handle, void *workspace, size_t size), (handle, workspace, size))
FORWARD(cublasSetMathMode, 0, (cublasHandle_t handle, cublasMath_t mode), (handle, mode))
FORWARD(cublasGemmEx, 0,
        (cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
         const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
         cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
         cublasComputeType_t compute, cublasGemmAlgo_t algo),
        (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo))
FORWARD(cublasGemmBatchedEx, 0,
        (cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
         const void *alpha, const void *const A[], cudaDataType at, int lda,
         const void *const B[], cudaDataType bt, int ldb, const void *beta, void *const C[],
         cudaDataType ct, int ldc, int batch, cublasComputeType_t compute,
         cublasGemmAlgo_t algo),
        (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, batch, compute,
         algo))
FORWARD(cublasGemmStridedBatchedEx, 0,
        (cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
         const void *alpha, const void *A, cudaDataType at, int lda, long long sa,
         const void *B, cudaDataType bt, int ldb, long long sb, const void *beta, void *C,
         cudaDataType ct, int ldc, long long sc, int batch, cublasComputeType_t compute,
         cublasGemmAlgo_t algo),
        (h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch,
         compute, algo))
FORWARD(cublasSgemm_v2, "cublasSgemm",
        (cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
         const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
         float *C, int ldc),
        (h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc))
FORWARD(cublasSgemmBatched, 0,
        (cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
         const float *alpha, const float *const A[], int lda, const float *const B[], int ldb,
         const float *beta, float *const C[], int ldc, int batch),
        (h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, batch))
FORWARD(cublasSgemmStridedBatched, 0,
        (cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
         const float *alpha, const float *A, int lda, long long sa, const float *B, int ldb,
         long long sb, const float *beta, float *C, int ldc, long long sc, int batch),
        (h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch))
FORWARD(cublasStrsmBatched, 0,
        (cublasHandle_t h, cublasSideMode_t side, cublasFillMode_t uplo, cublasOperation_t trans,
         cublasDiagType_t diag, int m, int n, const float *alpha, const float *const A[], int lda,
         float *const B[], int ldb, int batch),
        (h, side, uplo, trans, diag, m, n, alpha, A, lda, B, ldb, batch))

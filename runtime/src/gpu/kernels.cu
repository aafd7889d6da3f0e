// Veil's own CUDA kernels (cargo feature `gpu`): the linear layers between bootstraps, and
// the small helpers the device evaluation needs. Built by runtime/build.rs with nvcc and
// linked beside tfhe-cuda-backend, which provides the keyswitch and bootstrap kernels.
//
// A linear layer is a wrapping u64 sum of LWE ciphertexts (rows of `lwe_size` words)
// weighted by small integers: out[s][n] = sum_t w_t * x[b_t][s][c_t] (+ offset on the body).
// The weights are sparse (a convolution reads 9-300 of thousands of values), so each output
// row lists its terms (CSR); one thread computes one word of one output ciphertext, so the
// threads of a block read consecutive words of the same input ciphertexts (coalesced) and
// the same term (a broadcast).

#include <cstdint>
#include <cuda_runtime.h>

namespace {

struct Term {
  uint32_t block;  // which value block the input lives in
  uint32_t local;  // its index inside one sample's part of that block
  uint64_t weight; // the integer weight, as a wrapping u64
};

constexpr uint32_t THREADS = 128;

__global__ void linear_kernel(uint64_t *__restrict__ out,
                              const uint64_t *const *__restrict__ blocks,
                              const uint32_t *__restrict__ block_len,
                              const uint32_t *__restrict__ row_start,
                              const Term *__restrict__ terms,
                              const uint64_t *__restrict__ offset,
                              uint64_t body_fix, uint32_t n_out,
                              uint32_t samples, uint32_t lwe_size) {
  const uint32_t k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= lwe_size)
    return;
  const bool body = k == lwe_size - 1;
  for (uint32_t s = blockIdx.z; s < samples; s += gridDim.z) {
    for (uint32_t n = blockIdx.y; n < n_out; n += gridDim.y) {
      uint64_t acc = 0;
      const uint32_t end = row_start[n + 1];
      for (uint32_t t = row_start[n]; t < end; ++t) {
        const Term term = terms[t];
        const uint64_t *x =
            blocks[term.block] +
            ((uint64_t)s * block_len[term.block] + term.local) * lwe_size;
        acc += term.weight * x[k];
      }
      if (offset != nullptr && body)
        acc += offset[n] + body_fix;
      out[((uint64_t)s * n_out + n) * lwe_size + k] = acc;
    }
  }
}

__global__ void fill_index_kernel(uint64_t *out, uint64_t n,
                                  const uint64_t *map, uint64_t modulo) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x)
    out[i] = map == nullptr ? i : map[i % modulo];
}

} // namespace

extern "C" {

// Returns a cudaError_t (0 = success). `blocks` and `block_len` are device arrays of
// `n_blocks` entries; `row_start` has n_out + 1 entries; `offset` may be null.
int veil_linear_async(void *stream, uint64_t *out, const uint64_t *const *blocks,
                      const uint32_t *block_len, const uint32_t *row_start,
                      const void *terms, const uint64_t *offset,
                      uint64_t body_fix, uint32_t n_out, uint32_t samples,
                      uint32_t lwe_size) {
  if (n_out == 0 || samples == 0)
    return 0;
  dim3 grid((lwe_size + THREADS - 1) / THREADS, n_out < 65535 ? n_out : 65535,
            samples < 65535 ? samples : 65535);
  linear_kernel<<<grid, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
      out, blocks, block_len, row_start, static_cast<const Term *>(terms),
      offset, body_fix, n_out, samples, lwe_size);
  return (int)cudaGetLastError();
}

// out[i] = map[i % modulo] for i < n (null map: out[i] = i): the lookup-table index of
// every ciphertext of a layer, for all samples at once.
int veil_fill_index_async(void *stream, uint64_t *out, uint64_t n,
                          const uint64_t *map, uint64_t modulo) {
  if (n == 0)
    return 0;
  uint64_t blocks = (n + 255) / 256;
  fill_index_kernel<<<blocks < 4096 ? blocks : 4096, 256, 0,
                      static_cast<cudaStream_t>(stream)>>>(out, n, map, modulo);
  return (int)cudaGetLastError();
}

// Stream-ordered device memory from the default pool (tfhe-cuda-common keeps freed memory
// in it). Null, not an abort, when the device is full.
void *veil_device_alloc(uint64_t bytes, void *stream) {
  void *p = nullptr;
  if (cudaMallocAsync(&p, bytes, static_cast<cudaStream_t>(stream)) !=
      cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void veil_device_free(void *p, void *stream) {
  cudaFreeAsync(p, static_cast<cudaStream_t>(stream));
}

int veil_memcpy_async(void *dst, const void *src, uint64_t bytes,
                      void *stream) {
  if (bytes == 0)
    return 0;
  return (int)cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault,
                              static_cast<cudaStream_t>(stream));
}

// Page-locked host memory, so that copies to and from the device run at full speed and
// asynchronously. Returns null when it cannot be had.
void *veil_host_alloc(uint64_t bytes) {
  void *p = nullptr;
  if (cudaMallocHost(&p, bytes) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void veil_host_free(void *p) { cudaFreeHost(p); }

// Free device memory, counting what the default pool holds but no allocation uses (stream-
// ordered frees go back to that pool, which keeps them), and total memory.
int veil_mem_get_info(uint32_t gpu_index, uint64_t *free_bytes,
                      uint64_t *total_bytes) {
  cudaError_t e = cudaSetDevice((int)gpu_index);
  if (e != cudaSuccess)
    return (int)e;
  size_t f = 0, t = 0;
  e = cudaMemGetInfo(&f, &t);
  if (e != cudaSuccess)
    return (int)e;
  uint64_t pooled = 0;
  cudaMemPool_t pool;
  if (cudaDeviceGetDefaultMemPool(&pool, (int)gpu_index) == cudaSuccess) {
    unsigned long long reserved = 0, used = 0;
    if (cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent,
                                &reserved) == cudaSuccess &&
        cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used) ==
            cudaSuccess &&
        reserved > used)
      pooled = reserved - used;
  }
  cudaGetLastError();
  *free_bytes = f + pooled;
  *total_bytes = t;
  return 0;
}

// Waits for the stream and returns the first error it met (0 = none).
int veil_stream_sync(void *stream) {
  return (int)cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
}

const char *veil_error_string(int code) {
  return cudaGetErrorString((cudaError_t)code);
}

} // extern "C"

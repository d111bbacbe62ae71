// vlmem's GPU decode kernels: Y = X W^T for a weight W [rows, cols] read in its stored type
// (bf16, f16 or f32) straight from the device tier, accumulated in f32, for `n` input rows X
// [n, cols] (n = 1 in decode, a few rows in a short prefill).
//
// Nothing here needs bf16 arithmetic (SM 6.1, the MX250, has none): a bf16 is widened to f32
// by a shift, an f16 by cvt. Compiled to PTX for compute_61 by gen_ptx.py (NVRTC); the driver
// JIT-compiles that PTX for whatever GPU runs it (SM 6.1 and newer). No headers are included.
//
// Layout: one warp per weight row; a block of 8 warps (256 threads) covers 8 rows; grid.x
// covers the rows, grid.y the input rows. Each warp sums its row's products lane-wise and
// reduces with shuffles; lane 0 writes y.

#define WARP 32
#define ROWS_PER_BLOCK 8

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
#ifndef VLMEM_HOST_EMULATION
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
#else
    f = emulated_f16_to_f32(h);  // emulate.cpp: the kernels run on the CPU, lane by lane
#endif
    return f;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = WARP / 2; off > 0; off >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, off);
    }
    return v;
}

// One warp per weight row, lanes striding over the row one element at a time: any width and
// any alignment of the element type. `Widen` turns one stored element into f32.
template <typename T, float (*Widen)(T)>
__device__ __forceinline__ void matmul_rows(const T* __restrict__ w,
                                            const float* __restrict__ x,
                                            float* __restrict__ y, unsigned int rows,
                                            unsigned int cols) {
    unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    unsigned int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const T* wr = w + (size_t)row * cols;
    const float* xr = x + (size_t)blockIdx.y * cols;
    float acc = 0.0f;
    for (unsigned int c = lane; c < cols; c += WARP) {
        acc += Widen(wr[c]) * xr[c];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * rows + row] = acc;
}

__device__ __forceinline__ float f32_to_f32(float v) { return v; }

extern "C" __global__ void matmul_bf16(const unsigned short* __restrict__ w,
                                       const float* __restrict__ x, float* __restrict__ y,
                                       unsigned int rows, unsigned int cols) {
    matmul_rows<unsigned short, bf16_to_f32>(w, x, y, rows, cols);
}

extern "C" __global__ void matmul_f16(const unsigned short* __restrict__ w,
                                      const float* __restrict__ x, float* __restrict__ y,
                                      unsigned int rows, unsigned int cols) {
    matmul_rows<unsigned short, f16_to_f32>(w, x, y, rows, cols);
}

// f32 weights must be 4-byte aligned.
extern "C" __global__ void matmul_f32(const float* __restrict__ w,
                                      const float* __restrict__ x, float* __restrict__ y,
                                      unsigned int rows, unsigned int cols) {
    matmul_rows<float, f32_to_f32>(w, x, y, rows, cols);
}

// The dot product of 8 bf16 weights (one 16-byte load) with 8 inputs.
__device__ __forceinline__ float dot8(uint4 a, float4 x0, float4 x1) {
    return bf16_to_f32(a.x & 0xffff) * x0.x + bf16_to_f32(a.x >> 16) * x0.y
         + bf16_to_f32(a.y & 0xffff) * x0.z + bf16_to_f32(a.y >> 16) * x0.w
         + bf16_to_f32(a.z & 0xffff) * x1.x + bf16_to_f32(a.z >> 16) * x1.y
         + bf16_to_f32(a.w & 0xffff) * x1.z + bf16_to_f32(a.w >> 16) * x1.w;
}

// bf16 weights whose rows start on 16 bytes (cols a multiple of 8, w 16-byte aligned) and x
// likewise: each lane reads 8 weights (16 bytes) and 8 inputs at a time, two such loads in
// flight per iteration.
extern "C" __global__ void matmul_bf16_v8(const uint4* __restrict__ w,
                                          const float4* __restrict__ x,
                                          float* __restrict__ y, unsigned int rows,
                                          unsigned int cols) {
    unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    unsigned int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned int groups = cols / 8;
    const uint4* wr = w + (size_t)row * groups;
    const float4* xr = x + (size_t)blockIdx.y * (cols / 4);
    float acc0 = 0.0f, acc1 = 0.0f;
    unsigned int g = lane;
    for (; g + WARP < groups; g += 2 * WARP) {
        uint4 a = __ldg(wr + g);
        uint4 b = __ldg(wr + g + WARP);
        acc0 += dot8(a, __ldg(xr + 2 * g), __ldg(xr + 2 * g + 1));
        acc1 += dot8(b, __ldg(xr + 2 * (g + WARP)), __ldg(xr + 2 * (g + WARP) + 1));
    }
    for (; g < groups; g += WARP) {
        acc0 += dot8(__ldg(wr + g), __ldg(xr + 2 * g), __ldg(xr + 2 * g + 1));
    }
    float acc = warp_sum(acc0 + acc1);
    if (lane == 0) y[(size_t)blockIdx.y * rows + row] = acc;
}

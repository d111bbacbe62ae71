// vlmem's GPU decode kernels: Y = X W^T for a weight W [rows, cols] read in its stored type
// (bf16, f16, f32, Q8_0 or Q4_K) straight from the device tier, accumulated in f32, for `n`
// input rows X [n, cols] (n = 1 in decode, a few rows in a short prefill).
//
// Nothing here needs bf16 arithmetic (SM 6.1, the MX250, has none): a bf16 is widened to f32
// by a shift, an f16 by cvt. The quantized formats multiply 8-bit integers four at a time with
// dp4a (SM 6.1 and newer). Compiled to PTX for compute_61 by gen_ptx.py (NVRTC); the driver
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

// ---- Quantized weights: Q8_0 and Q4_K, with dp4a ----
//
// The input rows arrive quantized by the host (the CPU kernels' own quantizer, so both paths
// multiply the same integers): `xq` holds n * cols int8 quants, `xd` one f32 scale per input
// block (32 values for Q8_0, 256 for Q4_K), and for Q4_K `xs` the sum of each 32 quants (the
// min term's factor). Input value i of a block is xd * xq[i]. cols is whole weight blocks, so
// no input block straddles two input rows. xq must be 16-byte aligned and xd, xs 4-byte
// aligned (the host packs them so); the weights need only 2 bytes for Q8_0 (its blocks are
// 34 bytes, so its quants are read as 2-byte halves) and 4 for Q4_K (144-byte blocks).
//
// Each block's integer dot product is exact (int32, summed across the lanes that share the
// block with integer shuffles) and scaled once, as the CPU kernels' scalar path does, so the
// two differ only in the order (and fusing) of the f32 operations that follow.

#define FULL_MASK 0xffffffffu
#define Q8_0_ELEMS 32
#define Q8_0_BYTES 34
#define Q4_K_ELEMS 256
#define Q4_K_BYTES 144

// A load of a T at p, which must be aligned to sizeof(T) (the emulation checks it: a GPU
// faults on a misaligned load).
template <typename T>
__device__ __forceinline__ T load(const void* p) {
#ifdef VLMEM_HOST_EMULATION
    emulated_check_alignment(p, sizeof(T));
#endif
    return __ldg(reinterpret_cast<const T*>(p));
}

// Four int8 products of a and b summed into c (the bytes of a and b taken as signed).
__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int d;
#ifndef VLMEM_HOST_EMULATION
    // The instruction itself: NVRTC without headers has no __dp4a definition.
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
    d = emulated_dp4a(a, b, c);  // emulate.cpp
#endif
    return d;
}

// Four bytes at p, which need only be 2-byte aligned, as a little-endian word.
__device__ __forceinline__ int load_u16_pair(const unsigned char* p) {
    return (int)((unsigned int)load<unsigned short>(p) |
                 ((unsigned int)load<unsigned short>(p + 2) << 16));
}

// Q8_0: blocks of 32 values, an f16 scale then 32 int8 quants (34 bytes). Four lanes share a
// block, 8 quants each (two dp4a), so a warp covers 8 blocks per step; the 4 lanes' integer
// sums meet by shuffles and the first of them adds (d_w * d_x) * dot to its f32 sum. `xs` is
// unused (the signature is the Q4_K kernel's).
extern "C" __global__ void matmul_q8_0(const unsigned char* __restrict__ w,
                                       const signed char* __restrict__ xq,
                                       const float* __restrict__ xd,
                                       const short* __restrict__ xs, float* __restrict__ y,
                                       unsigned int rows, unsigned int cols) {
    (void)xs;
    unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    unsigned int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned int blocks = cols / Q8_0_ELEMS;
    const unsigned char* wr = w + (size_t)row * blocks * Q8_0_BYTES;
    const signed char* xr = xq + (size_t)blockIdx.y * cols;
    const float* dr = xd + (size_t)blockIdx.y * blocks;
    unsigned int part = lane % 4;  // quants 8 part .. 8 part + 8 of the block
    float acc = 0.0f;
    // Every lane runs every step (the shuffles need the whole warp); lanes past the row's
    // last block contribute nothing.
    for (unsigned int b0 = 0; b0 < blocks; b0 += WARP / 4) {
        unsigned int b = b0 + lane / 4;
        int dot = 0;
        if (b < blocks) {
            const unsigned char* q = wr + (size_t)b * Q8_0_BYTES + 2 + 8 * part;
            int2 xv = load<int2>(xr + (size_t)b * Q8_0_ELEMS + 8 * part);
            dot = dp4a(load_u16_pair(q), xv.x, dp4a(load_u16_pair(q + 4), xv.y, 0));
        }
        dot += __shfl_xor_sync(FULL_MASK, dot, 1);
        dot += __shfl_xor_sync(FULL_MASK, dot, 2);
        if (b < blocks && part == 0) {
            float d = f16_to_f32(load<unsigned short>(wr + (size_t)b * Q8_0_BYTES)) * dr[b];
            acc += d * (float)dot;
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * rows + row] = acc;
}

// Q4_K (GGUF block_q4_K): super-blocks of 256 values in 144 bytes: f16 d, f16 dmin, 12 bytes
// of packed 6-bit scales sc_j and mins m_j of the 8 sub-blocks of 32, then 128 bytes of
// nibbles, byte k of group g (32 bytes) holding value 64 g + k in its low nibble and value
// 64 g + 32 + k in its high one. Value i of sub-block j is d sc_j q_i - dmin m_j, so a block's
// product with the input block dx qx is
//     (d dx) sum_j sc_j sum_{i in j} q_i qx_i  -  (dmin dx) sum_j m_j sum_{i in j} qx_i,
// both sums exact integers (below 2^25 and 2^21), the second from the input's sums `xs`.
// Eight lanes share a block: lane part p = 2 g + h reads 16 bytes of group g (h picks the
// half), i.e. 16 values of sub-block 2 g and 16 of sub-block 2 g + 1 (eight dp4a); a warp
// covers 4 blocks per step.
extern "C" __global__ void matmul_q4_k(const unsigned char* __restrict__ w,
                                       const signed char* __restrict__ xq,
                                       const float* __restrict__ xd,
                                       const short* __restrict__ xs, float* __restrict__ y,
                                       unsigned int rows, unsigned int cols) {
    unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    unsigned int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned int blocks = cols / Q4_K_ELEMS;
    const unsigned char* wr = w + (size_t)row * blocks * Q4_K_BYTES;
    const signed char* xr = xq + (size_t)blockIdx.y * cols;
    const float* dr = xd + (size_t)blockIdx.y * blocks;
    const short* sr = xs + (size_t)blockIdx.y * blocks * 8;
    unsigned int part = lane % 8, g = part / 2, h = part % 2;
    float acc = 0.0f;
    for (unsigned int b0 = 0; b0 < blocks; b0 += WARP / 8) {
        unsigned int b = b0 + lane / 8;
        const unsigned char* blk = wr + (size_t)b * Q4_K_BYTES;
        int dot = 0, mins = 0;
        if (b < blocks) {
            // The scales and mins of sub-blocks 2 g and 2 g + 1: bytes 2 g and 2 g + 1 of
            // the eight, unpacked from the three words as the format's unpack_scale_words.
            unsigned int sa = load<unsigned int>(blk + 4);
            unsigned int sb = load<unsigned int>(blk + 8);
            unsigned int sc4 = load<unsigned int>(blk + 12);
            unsigned int sc = g < 2 ? (sa & 0x3f3f3f3fu)
                                    : ((sc4 & 0x0f0f0f0fu) | ((sa >> 2) & 0x30303030u));
            unsigned int m = g < 2 ? (sb & 0x3f3f3f3fu)
                                   : (((sc4 >> 4) & 0x0f0f0f0fu) | ((sb >> 2) & 0x30303030u));
            unsigned int shift = 16 * (g & 1);
            sc >>= shift;
            m >>= shift;
            const unsigned char* q = blk + 16 + 32 * g + 16 * h;
            const signed char* x = xr + (size_t)b * Q4_K_ELEMS + 64 * g + 16 * h;
            int4 xlo = load<int4>(x), xhi = load<int4>(x + 32);
            unsigned int v0 = load<unsigned int>(q), v1 = load<unsigned int>(q + 4);
            unsigned int v2 = load<unsigned int>(q + 8), v3 = load<unsigned int>(q + 12);
            int lo = dp4a((int)(v0 & 0x0f0f0f0fu), xlo.x, 0);
            lo = dp4a((int)(v1 & 0x0f0f0f0fu), xlo.y, lo);
            lo = dp4a((int)(v2 & 0x0f0f0f0fu), xlo.z, lo);
            lo = dp4a((int)(v3 & 0x0f0f0f0fu), xlo.w, lo);
            int hi = dp4a((int)((v0 >> 4) & 0x0f0f0f0fu), xhi.x, 0);
            hi = dp4a((int)((v1 >> 4) & 0x0f0f0f0fu), xhi.y, hi);
            hi = dp4a((int)((v2 >> 4) & 0x0f0f0f0fu), xhi.z, hi);
            hi = dp4a((int)((v3 >> 4) & 0x0f0f0f0fu), xhi.w, hi);
            dot = (int)(sc & 0xff) * lo + (int)((sc >> 8) & 0xff) * hi;
            if (h == 0) {
                // The input sums of sub-blocks 2 g and 2 g + 1 (one 4-byte load).
                unsigned int s = load<unsigned int>(sr + (size_t)b * 8 + 2 * g);
                mins = (int)(m & 0xff) * (int)(short)(s & 0xffff) +
                       (int)((m >> 8) & 0xff) * (int)(short)(s >> 16);
            }
        }
        dot += __shfl_xor_sync(FULL_MASK, dot, 1);
        dot += __shfl_xor_sync(FULL_MASK, dot, 2);
        dot += __shfl_xor_sync(FULL_MASK, dot, 4);
        // Only the even parts hold a mins term.
        mins += __shfl_xor_sync(FULL_MASK, mins, 2);
        mins += __shfl_xor_sync(FULL_MASK, mins, 4);
        if (b < blocks && part == 0) {
            unsigned int dd = load<unsigned int>(blk);
            float dx = dr[b];
            float d = f16_to_f32((unsigned short)(dd & 0xffff));
            float dmin = f16_to_f32((unsigned short)(dd >> 16));
            acc += d * dx * (float)dot - dmin * dx * (float)mins;
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * rows + row] = acc;
}

// Runs decode.cu's kernels on the CPU, one std::thread per GPU thread with warp shuffles
// emulated through a barrier. Not a GPU test: it checks the kernels' indexing, vector paths,
// remainders, reductions and load alignment where no GPU is at hand.
//
//     g++ -std=c++20 -O1 -pthread emulate.cpp -o /tmp/emulate && /tmp/emulate
//
// With no arguments it checks every float kernel (bf16, f16, f32) against a double-precision
// reference on odd and aligned shapes. With two, `emulate IN OUT`, it runs one quantized
// kernel on the case in file IN and writes its n * rows f32 outputs to OUT, for a caller that
// compares them with the CPU kernels (tests/gpu.rs). IN is little-endian: five u32 (format:
// 0 = Q8_0, 1 = Q4_K; rows; cols; n; the weight's byte offset past a 16-byte boundary),
// then the weight bytes, then the input packed as the host packs it for the GPU: n * cols
// int8 quants, then one f32 scale per input block, then (Q4_K) one i16 sum per 32 quants.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <thread>
#include <vector>

struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
struct int4 { int x, y, z, w; };
struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 blockIdx, threadIdx;

struct Warp {
    std::barrier<> bar{32};
    float vals[32];
    int ivals[32];
};
thread_local Warp* this_warp;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define VLMEM_HOST_EMULATION 1

template <class T> T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __shfl_down_sync(unsigned, float v, int off) {
    unsigned lane = threadIdx.x % 32;
    this_warp->vals[lane] = v;
    this_warp->bar.arrive_and_wait();
    float r = lane + off < 32 ? this_warp->vals[lane + off] : v;
    this_warp->bar.arrive_and_wait();
    return r;
}
inline int __shfl_xor_sync(unsigned, int v, int mask) {
    unsigned lane = threadIdx.x % 32;
    this_warp->ivals[lane] = v;
    this_warp->bar.arrive_and_wait();
    int r = this_warp->ivals[(lane ^ (unsigned)mask) % 32];
    this_warp->bar.arrive_and_wait();
    return r;
}
// __dp4a(a, b, c) with signed bytes: c plus the four products of the bytes of a and b.
inline int emulated_dp4a(int a, int b, int c) {
    long long sum = c;
    for (int k = 0; k < 4; k++) {
        sum += (long long)(signed char)(a >> (8 * k)) * (signed char)(b >> (8 * k));
    }
    return (int)sum;  // the GPU wraps modulo 2^32; the kernels' sums never get near it
}
// A GPU faults on a load that is not aligned to its size: so does the emulation.
inline void emulated_check_alignment(const void* p, unsigned long size) {
    if ((unsigned long)p % size != 0) {
        std::fprintf(stderr, "misaligned %lu-byte load at %p\n", size, p);
        std::abort();
    }
}
inline float emulated_f16_to_f32(unsigned short h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
}

#include "decode.cu"

using Kernel = void (*)(const void*, const float*, float*, unsigned, unsigned);

// Runs `kernel` on the grid the host launches: (rows / 8 rounded up, n) blocks of 8 warps.
static void run_grid(unsigned rows, unsigned n, const std::function<void()>& kernel) {
    for (unsigned by = 0; by < n; by++) {
        for (unsigned bx = 0; bx < (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK; bx++) {
            for (unsigned warp = 0; warp < ROWS_PER_BLOCK; warp++) {
                Warp wp;
                std::vector<std::thread> lanes;
                for (unsigned lane = 0; lane < 32; lane++) {
                    lanes.emplace_back([&, lane] {
                        blockIdx = {bx, by, 0};
                        threadIdx = {warp * 32 + lane, 0, 0};
                        this_warp = &wp;
                        kernel();
                    });
                }
                for (auto& t : lanes) t.join();
            }
        }
    }
}

static void launch(Kernel k, const void* w, const float* x, float* y, unsigned rows,
                   unsigned cols, unsigned n) {
    run_grid(rows, n, [&] { k(w, x, y, rows, cols); });
}

// `emulate IN OUT`: one quantized case (see the top of the file).
static int run_quantized(const char* in_path, const char* out_path) {
    std::ifstream in(in_path, std::ios::binary);
    std::vector<unsigned char> file((std::istreambuf_iterator<char>(in)), {});
    unsigned h[5];
    if (file.size() < sizeof h) return std::fprintf(stderr, "short header\n"), 2;
    std::memcpy(h, file.data(), sizeof h);
    unsigned format = h[0], rows = h[1], cols = h[2], n = h[3], offset = h[4];
    size_t elems = format == 0 ? Q8_0_ELEMS : Q4_K_ELEMS;
    size_t block_bytes = format == 0 ? Q8_0_BYTES : Q4_K_BYTES;
    size_t w_len = (size_t)rows * (cols / elems) * block_bytes;
    size_t q_len = (size_t)n * cols, d_len = q_len / elems * 4;
    size_t s_len = format == 0 ? 0 : q_len / 32 * 2;
    if (format > 1 || cols % elems != 0 || file.size() != sizeof h + w_len + q_len + d_len + s_len)
        return std::fprintf(stderr, "bad case: format %u, %u x %u, n %u, %zu bytes\n", format,
                            rows, cols, n, file.size()), 2;
    // The weight `offset` bytes past a 16-byte boundary, the input in one 16-byte aligned
    // buffer laid out as the device buffer: quants, scales, sums.
    auto aligned = [](size_t len) {
        return (unsigned char*)std::aligned_alloc(16, (len + 15) / 16 * 16 + 16);
    };
    unsigned char* wbuf = aligned(offset + w_len);
    unsigned char* xbuf = aligned(q_len + d_len + s_len);
    std::memcpy(wbuf + offset, file.data() + sizeof h, w_len);
    std::memcpy(xbuf, file.data() + sizeof h + w_len, q_len + d_len + s_len);
    const unsigned char* w = wbuf + offset;
    const signed char* xq = (const signed char*)xbuf;
    const float* xd = (const float*)(xbuf + q_len);
    const short* xs = (const short*)(xbuf + q_len + d_len);
    std::vector<float> y((size_t)n * rows, NAN);
    run_grid(rows, n, [&] {
        if (format == 0) matmul_q8_0(w, xq, xd, xs, y.data(), rows, cols);
        else matmul_q4_k(w, xq, xd, xs, y.data(), rows, cols);
    });
    std::free(wbuf);
    std::free(xbuf);
    std::ofstream out(out_path, std::ios::binary);
    out.write((const char*)y.data(), (std::streamsize)(y.size() * sizeof(float)));
    return out.good() ? 0 : 2;
}

static unsigned long long state = 0x9E3779B97F4A7C15ull;
static float uniform() {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (float)((state >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

int main(int argc, char** argv) {
    if (argc == 3) return run_quantized(argv[1], argv[2]);
    struct Shape { unsigned rows, cols; } shapes[] = {{1, 1}, {7, 13}, {3, 8}, {33, 264}, {9, 1000}, {17, 72}};
    int failures = 0, checked = 0;
    for (auto s : shapes) {
        for (unsigned n : {1u, 3u}) {
            size_t count = (size_t)s.rows * s.cols;
            std::vector<float> wv(count), x((size_t)n * s.cols);
            for (auto& v : wv) v = uniform();
            for (auto& v : x) v = uniform();
            std::vector<unsigned short> wb(count), wh(count);
            std::vector<float> wf(count), wbv(count), whv(count);
            for (size_t i = 0; i < count; i++) {
                unsigned u; std::memcpy(&u, &wv[i], 4);
                wb[i] = (unsigned short)(u >> 16);
                wbv[i] = __uint_as_float((unsigned)wb[i] << 16);
                _Float16 h = (_Float16)wv[i];
                std::memcpy(&wh[i], &h, 2);
                whv[i] = (float)h;
                wf[i] = wv[i];
            }
            struct Case { const char* name; Kernel k; const void* w; const std::vector<float>* vals; bool ok; } cases[] = {
                {"matmul_bf16", (Kernel)matmul_bf16, wb.data(), &wbv, true},
                {"matmul_bf16_v8", (Kernel)matmul_bf16_v8, wb.data(), &wbv, s.cols % 8 == 0},
                {"matmul_f16", (Kernel)matmul_f16, wh.data(), &whv, true},
                {"matmul_f32", (Kernel)matmul_f32, wf.data(), &wf, true},
            };
            for (auto& c : cases) {
                if (!c.ok) continue;
                std::vector<float> y((size_t)n * s.rows, NAN);
                launch(c.k, c.w, x.data(), y.data(), s.rows, s.cols, n);
                double worst = 0;
                for (unsigned t = 0; t < n; t++)
                    for (unsigned r = 0; r < s.rows; r++) {
                        double want = 0;
                        for (unsigned col = 0; col < s.cols; col++)
                            want += (double)(*c.vals)[(size_t)r * s.cols + col] * x[(size_t)t * s.cols + col];
                        double err = std::fabs(y[(size_t)t * s.rows + r] - want);
                        if (!(err <= worst)) worst = err;  // NaN (an unwritten output) sticks
                    }
                double tol = 1e-5 * std::sqrt((double)s.cols) + 1e-6;
                bool ok = worst <= tol;
                checked++;
                if (!ok) failures++;
                std::printf("%-15s %4u x %-5u n=%u max abs err %.2e %s\n", c.name, s.rows, s.cols, n, worst, ok ? "ok" : "FAIL");
            }
        }
    }
    std::printf("%d of %d checks passed\n", checked - failures, checked);
    return failures != 0;
}

// Runs decode.cu's kernels on the CPU, one std::thread per GPU thread with warp shuffles
// emulated through a barrier, and checks every kernel against a double-precision reference on
// odd and aligned shapes. Not a GPU test: it checks the kernels' indexing, vector path,
// remainders and reductions where no GPU is at hand.
//
//     g++ -std=c++20 -O1 -pthread emulate.cpp -o /tmp/emulate && /tmp/emulate
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 blockIdx, threadIdx;

struct Warp {
    std::barrier<> bar{32};
    float vals[32];
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
inline float emulated_f16_to_f32(unsigned short h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
}

#include "decode.cu"

using Kernel = void (*)(const void*, const float*, float*, unsigned, unsigned);

static void launch(Kernel k, const void* w, const float* x, float* y, unsigned rows,
                   unsigned cols, unsigned n) {
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
                        k(w, x, y, rows, cols);
                    });
                }
                for (auto& t : lanes) t.join();
            }
        }
    }
}

static unsigned long long state = 0x9E3779B97F4A7C15ull;
static float uniform() {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (float)((state >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

int main() {
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

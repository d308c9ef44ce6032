#include "membench.h"

#include <chrono>
#include <cstdint>
#include <vector>

#include "thread_pool.h"

namespace dllama {

double measure_read_bandwidth(size_t bytes, int n_threads, int repeats) {
    const size_t n = bytes / sizeof(uint64_t);
    std::vector<uint64_t> data(n);
    for (size_t i = 0; i < n; i++) data[i] = i * 0x9E3779B97F4A7C15ull;  // touch every page
    ThreadPool pool(n_threads);
    std::vector<uint64_t> sums((size_t)n_threads * 8);
    double best = 0;
    for (int r = 0; r < repeats; r++) {
        const auto start = std::chrono::steady_clock::now();
        pool.run([&](int t, int nt) {
            const size_t begin = n * t / nt, end = n * (t + 1) / nt;
            // four independent sums keep several loads in flight, like a matmul's row stream
            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            size_t i = begin;
            for (; i + 4 <= end; i += 4) {
                s0 += data[i];
                s1 += data[i + 1];
                s2 += data[i + 2];
                s3 += data[i + 3];
            }
            for (; i < end; i++) s0 += data[i];
            sums[(size_t)t * 8] = s0 + s1 + s2 + s3;  // kept so the loads are not optimised away
        });
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        const double rate = (double)(n * sizeof(uint64_t)) / seconds;
        if (rate > best) best = rate;
    }
    volatile uint64_t sink = 0;
    for (uint64_t s : sums) sink = sink + s;
    return best;
}

}  // namespace dllama

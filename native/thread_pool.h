// A persistent pool: threads are created once and reused for every op of every step.
// Inside a step they spin between ops (an op lasts microseconds; waking a sleeping thread costs
// more than the op), and go to sleep on a condition variable when no work came for a while.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace dllama {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // Runs fn(thread_index, n_threads) on every thread (the caller is thread 0) and returns when
    // all are done.
    template <typename Fn>
    void run(Fn&& fn) {
        auto call = [](void* ctx, int t, int n) { (*static_cast<Fn*>(ctx))(t, n); };
        dispatch(call, &fn);
    }

    // Runs fn(chunk) for chunk in [0, n_chunks), chunks handed out dynamically so that uneven
    // work (experts with more tokens) balances itself.
    template <typename Fn>
    void for_chunks(int n_chunks, Fn&& fn) {
        if (n_chunks <= 0) return;
        if (n_threads_ == 1 || n_chunks == 1) {
            for (int c = 0; c < n_chunks; c++) fn(c);
            return;
        }
        std::atomic<int> next{0};
        run([&](int, int) {
            for (int c = next.fetch_add(1, std::memory_order_relaxed); c < n_chunks;
                 c = next.fetch_add(1, std::memory_order_relaxed))
                fn(c);
        });
    }

private:
    using Call = void (*)(void*, int, int);
    void dispatch(Call call, void* ctx);
    void worker_loop(int index);

    int n_threads_;
    std::vector<std::thread> threads_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    std::atomic<int> sleepers_{0};
    Call call_ = nullptr;
    void* ctx_ = nullptr;
    std::mutex mutex_;
    std::condition_variable wake_;
};

}  // namespace dllama

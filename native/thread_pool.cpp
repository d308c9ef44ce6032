#include "thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace dllama {

// How long an idle worker spins (pauses, then yields) before sleeping: a few milliseconds,
// long enough to bridge the gap between two ops of one step, short enough not to burn a core
// between requests.
static constexpr int kSpinIterations = 1 << 14;
// Pauses (tens of microseconds) after which a waiting thread also yields its core at every turn:
// when the machine has more runnable threads than cores (other services, a loaded CI host), the
// thread it waits for may be the one the scheduler has just set aside, and spinning would keep it
// off the core for a whole time slice.
static constexpr int kSpinsBeforeYield = 1 << 10;

static inline void wait_turn(int spin) {
    if (spin < kSpinsBeforeYield) cpu_relax();
    else std::this_thread::yield();
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; i++) threads_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
}

void ThreadPool::dispatch(Call call, void* ctx) {
    if (n_threads_ == 1) {
        call(ctx, 0, 1);
        return;
    }
    call_ = call;
    ctx_ = ctx;
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    {
        // The lock orders the generation bump with a worker's check-then-sleep.
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    call(ctx, 0, n_threads_);
    for (int spin = 0; pending_.load(std::memory_order_acquire) > 0; spin++) wait_turn(spin);
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = generation_.load(std::memory_order_acquire);
        for (int spin = 0; gen == seen && spin < kSpinIterations; spin++) {
            wait_turn(spin);
            gen = generation_.load(std::memory_order_acquire);
        }
        if (gen == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            sleepers_.fetch_add(1);
            wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            sleepers_.fetch_sub(1);
            gen = generation_.load(std::memory_order_acquire);
        }
        seen = gen;
        if (stop_.load()) return;
        call_(ctx_, index, n_threads_);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

}  // namespace dllama

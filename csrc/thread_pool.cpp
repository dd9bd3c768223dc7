// parallel.h's regions without OpenMP: gally's own threads. Each thread that opens a region keeps
// its own workers (so that two sessions forwarding in two threads at once do not share a team),
// started when first needed and kept for the thread's life. A region hands its body to them by
// bumping a generation counter; barriers count arrivals and bump their own generation. Waiting
// spins for a while, as OpenMP's barriers do (a decode step passes several per layer, microseconds
// apart), then sleeps on the atomic (C++20 wait/notify).
#include "parallel.h"

#if !defined(_OPENMP)
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace gally::par::pool {

thread_local Member self;

namespace {

constexpr int SPINS = 1 << 14;  // pause instructions before sleeping: tens of microseconds

inline void relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// Waits until `value` differs from `old`.
template <class T>
void wait_change(const std::atomic<T>& value, T old) {
  for (int i = 0; i < SPINS; ++i) {
    if (value.load(std::memory_order_acquire) != old) return;
    relax();
  }
  while (value.load(std::memory_order_acquire) == old) value.wait(old, std::memory_order_acquire);
}

}  // namespace

// The threads of one region.
struct Team {
  int count = 1;
  std::atomic<int> arrived{0};
  std::atomic<unsigned> barrier_generation{0};
  std::atomic<int> next[2];  // dynamic loops alternate between two counters (next_index)
};

namespace {

// A thread's workers: worker w runs as member w + 1 of each region the thread opens.
class Workers {
 public:
  ~Workers() {
    stop_ = true;
    job_generation_.fetch_add(1, std::memory_order_release);
    job_generation_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int threads, void (*call)(void*), void* ctx) {
    while (int(threads_.size()) < threads - 1) {
      const int id = int(threads_.size()) + 1;
      const unsigned now = job_generation_.load(std::memory_order_relaxed);  // its first region is the next one
      threads_.emplace_back([this, id, now] { loop(id, now); });
    }
    team_.count = threads;
    team_.arrived.store(0, std::memory_order_relaxed);
    team_.next[0].store(0, std::memory_order_relaxed);
    team_.next[1].store(0, std::memory_order_relaxed);
    call_ = call, ctx_ = ctx, error_ = nullptr;
    pending_.store(int(threads_.size()), std::memory_order_relaxed);
    job_generation_.fetch_add(1, std::memory_order_release);
    job_generation_.notify_all();
    member(0, [&] { call(ctx); });
    for (int left; (left = pending_.load(std::memory_order_acquire)) != 0;) wait_change(pending_, left);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  template <class F>
  void member(int id, F&& body) {
    self = Member{&team_, id, team_.count, 0};
    try {
      body();
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
    self = Member{};
  }

  // Every worker answers every region, those it does not need at once, so that the next region is
  // set up only when none of them reads this one's settings any more.
  void loop(int id, unsigned seen) {
    for (;;) {
      wait_change(job_generation_, seen);
      seen = job_generation_.load(std::memory_order_acquire);
      if (stop_) return;
      if (id < team_.count) member(id, [&] { call_(ctx_); });
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  Team team_;
  std::atomic<unsigned> job_generation_{0};
  std::atomic<int> pending_{0};  // workers yet to finish (or pass on) the current region
  void (*call_)(void*) = nullptr;
  void* ctx_ = nullptr;
  std::exception_ptr error_;
  std::mutex error_mutex_;
  bool stop_ = false;
};

}  // namespace

void run(int threads, void (*call)(void*), void* ctx) {
  if (threads <= 1 || self.team) {  // one thread, or a region inside a region: this thread alone
    const Member outer = self;
    self = Member{};
    try {
      call(ctx);
    } catch (...) {
      self = outer;
      throw;
    }
    self = outer;
    return;
  }
  static thread_local std::unique_ptr<Workers> workers;
  if (!workers) workers = std::make_unique<Workers>();
  workers->run(threads, call, ctx);
}

void barrier() {
  Team* t = self.team;
  if (!t || t->count == 1) return;
  const unsigned generation = t->barrier_generation.load(std::memory_order_acquire);
  if (t->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == t->count) {  // the last to arrive opens it
    t->arrived.store(0, std::memory_order_relaxed);
    t->barrier_generation.fetch_add(1, std::memory_order_release);
    t->barrier_generation.notify_all();
    return;
  }
  wait_change(t->barrier_generation, generation);
}

// Loop k takes its indices from next[k % 2]. Member 0 zeroes the other counter as it enters loop k:
// loop k − 1, its last user, ended at a barrier every thread passed, and loop k + 1, its next
// user, starts after loop k's closing barrier, which member 0 reaches only after zeroing it.
int begin_dynamic() {
  const int loop = self.dynamic_loops++;
  if (self.id == 0) self.team->next[(loop + 1) % 2].store(0, std::memory_order_relaxed);
  return loop;
}

int next_index(int loop) { return self.team->next[loop % 2].fetch_add(1, std::memory_order_relaxed); }

}  // namespace gally::par::pool
#endif

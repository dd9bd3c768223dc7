// The threads of a forward pass: one parallel region per call, inside which every thread runs the
// same steps and shares the work of each. The steps call these instead of OpenMP pragmas, so that
// the model code reads as plain functions and a build without OpenMP has one place to fill in.
//
//   par::region(threads, [&] { … });   // the body runs once on each of `threads` threads
//   par::for_static(n, f);               // f(i) for i < n, split evenly; a barrier at the end
//   par::for_dynamic(n, f);              // the same, one i at a time to whichever thread is free
//   par::barrier();                      // wait until every thread of the region arrives
//
// Each of these must be reached by every thread of the region, in the same order (OpenMP's rule
// for work-sharing constructs), so a step may split work but never skip a barrier on some threads.
//
// With OpenMP (GCC, clang with libomp) these are its pragmas. Without it (Apple's clang unless
// Homebrew's libomp is found) they run on gally's own threads (thread_pool.cpp): each thread that
// opens a region keeps a team of workers for its regions, woken per region; barriers spin briefly,
// then sleep. A region opened inside a region runs on the thread that opens it, as OpenMP's does.
#pragma once
#include <algorithm>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace gally::par {

constexpr bool kOpenMP =
#if defined(_OPENMP)
    true;
#else
    false;
#endif

// "openmp", or "threads" for gally's own pool
constexpr const char* backend() { return kOpenMP ? "openmp" : "threads"; }

#if !defined(_OPENMP)
namespace pool {
struct Team;
// The calling thread's place in its region: none (a team of one) outside a region.
struct Member {
  Team* team = nullptr;
  int id = 0, count = 1;
  int dynamic_loops = 0;  // for_dynamic loops this thread has entered in its region
};
extern thread_local Member self;
// Runs call(ctx) on `threads` threads: this one (id 0) and threads − 1 workers; returns when all are done.
void run(int threads, void (*call)(void*), void* ctx);
void barrier();
// for_dynamic's loops: the number of the loop this thread enters (every thread of a region counts
// them alike), then the next index of that loop's shared counter.
int begin_dynamic();
int next_index(int loop);
}  // namespace pool
#endif

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return pool::self.id;
#endif
}

inline int thread_count() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return pool::self.count;
#endif
}

template <class F>
void region(int threads, F&& body) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  body();
#else
  using Body = std::remove_reference_t<F>;
  pool::run(
      threads, [](void* b) { (*static_cast<Body*>(b))(); }, const_cast<void*>(static_cast<const void*>(&body)));
#endif
}

inline void barrier() {
#if defined(_OPENMP)
#pragma omp barrier
#else
  pool::barrier();
#endif
}

template <class F>
void for_static(int n, F&& f) {
#if defined(_OPENMP)
#pragma omp for schedule(static)
  for (int i = 0; i < n; ++i) f(i);
#else
  const int nt = thread_count(), id = thread_id();  // contiguous runs, as OpenMP's static schedule
  for (int i = int(long(n) * id / nt); i < int(long(n) * (id + 1) / nt); ++i) f(i);
  pool::barrier();
#endif
}

template <class F>
void for_dynamic(int n, F&& f) {
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
  for (int i = 0; i < n; ++i) f(i);
#else
  if (thread_count() == 1) {
    for (int i = 0; i < n; ++i) f(i);
    return;
  }
  const int loop = pool::begin_dynamic();
  for (int i; (i = pool::next_index(loop)) < n;) f(i);
  pool::barrier();
#endif
}

// This thread's share [begin, end) of n items split in blocks of `block` items: contiguous runs,
// so that a thread's rows of a matrix are one stream for the prefetchers.
inline void share(int n, int block, int* begin, int* end) {
  const int blocks = (n + block - 1) / block, nt = thread_count(), id = thread_id();
  *begin = std::min(n, int(long(blocks) * id / nt) * block);
  *end = std::min(n, int(long(blocks) * (id + 1) / nt) * block);
}

}  // namespace gally::par

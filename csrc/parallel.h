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
#pragma once
#include <algorithm>

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

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int thread_count() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

template <class F>
void region(int threads, F&& body) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  body();
#else
  (void)threads;
  body();
#endif
}

inline void barrier() {
#if defined(_OPENMP)
#pragma omp barrier
#endif
}

template <class F>
void for_static(int n, F&& f) {
#if defined(_OPENMP)
#pragma omp for schedule(static)
  for (int i = 0; i < n; ++i) f(i);
#else
  for (int i = 0; i < n; ++i) f(i);
#endif
}

template <class F>
void for_dynamic(int n, F&& f) {
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
  for (int i = 0; i < n; ++i) f(i);
#else
  for (int i = 0; i < n; ++i) f(i);
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

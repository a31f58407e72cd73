// The threads the kernels share out their work on.
//
// Why not OpenMP's own: libgomp's idle threads spin for their next region (300 000 pauses, about
// 14 ms on this project's machines) unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set before the
// process starts — which a library cannot do for its host. On a shared machine those spinning
// threads take the cores other processes want, and every region then waits for a descheduled
// thread: `qkv demo` ran 5.4× slower beside two busy processes instead of 2×. These workers spin
// for at most kSpinMicroseconds after a call and then sleep on a condition variable, so a busy
// machine slows qkv down fairly and a loop of calls still finds them awake. OpenMP's thread count
// (OMP_NUM_THREADS, omp_get_max_threads) still says how many threads "all cores" means.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>

namespace qkv::kernels {

// How long a worker, or a caller waiting for its workers, spins before it sleeps: long enough to
// bridge the serial steps between the parallel loops of one call (at 50 µs the backward of S1
// paid 7% in wake-ups), 70× shorter than libgomp's default.
inline constexpr int kSpinMicroseconds = 200;

// Runs task(0) on the calling thread and task(w), 0 < w < workers, on each helper that joins in
// time, and returns when every task that started has returned. A task must take its work from a
// queue it shares with the others (see parallel_for): the caller's task(0) may find itself alone —
// when the helpers are busy with a nested or concurrent call, or have not woken before the caller
// ran out of work (a helper without a core on a busy machine never holds the call up). An
// exception from task(0) leaves the call once the helpers inside it have finished; one from a
// helper ends the process, so tasks do their checking before work is shared out.
void run_on_workers(int workers, const std::function<void(int worker)>& task);

// Runs take(next, workers) on `workers` = min(threads, count) threads (on the calling thread
// alone when that is one), every one taking indices of [0, count) from the shared counter `next`:
// the skeleton of the two loops below.
template <class Take>
void share_indices(int threads, std::int64_t count, Take take) {
  if (count <= 0) return;
  const int workers = static_cast<int>(std::min<std::int64_t>(std::max(threads, 1), count));
  std::atomic<std::int64_t> next{0};
  const auto task = [&](int) { take(next, workers); };
  if (workers == 1) {
    task(0);
  } else {
    run_on_workers(workers, task);
  }
}

// Calls body(state, i) for every i in [0, count), on up to `threads` threads, handing the indices
// out one at a time (the longest items first is the caller's order to choose). Each thread that
// takes part makes its own state with make_state() first (its scratch buffers). With one thread,
// or one index, no worker is woken.
template <class MakeState, class Body>
void parallel_for_each(int threads, std::int64_t count, MakeState make_state, Body body) {
  share_indices(threads, count, [&](std::atomic<std::int64_t>& next, int) {
    auto state = make_state();
    for (std::int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) body(state, i);
  });
}

// As parallel_for_each, and each thread claims the index it will take next before it works on
// the current one and calls prepare(state, next) first, so that prepare can ask for next's data
// (prefetches) while the current index computes. A thread holds an index back only while more
// than two per thread remain, so that no thread finds the queue empty while another holds work.
template <class MakeState, class Prepare, class Body>
void parallel_for_each_ahead(int threads, std::int64_t count, MakeState make_state, Prepare prepare,
                             Body body) {
  share_indices(threads, count, [&](std::atomic<std::int64_t>& next, int workers) {
    auto state = make_state();
    std::int64_t index = next.fetch_add(1);
    while (index < count) {
      std::int64_t following = count;
      if (count - next.load(std::memory_order_relaxed) > 2 * std::int64_t{workers}) {
        following = next.fetch_add(1);
        if (following < count) prepare(state, following);
      }
      body(state, index);
      index = following < count ? following : next.fetch_add(1);
    }
  });
}

// body(i) for every i in [0, count): a loop of many small, equal iterations. The indices go out
// in about 16 runs per thread (not one at a time: a shared counter bumped per index by two
// cores costs more than the index's own work).
template <class Body>
void parallel_for(int threads, std::int64_t count, Body body) {
  const std::int64_t run =
      std::max<std::int64_t>(1, count / (16 * static_cast<std::int64_t>(std::max(threads, 1))));
  parallel_for_each(
      threads, (count + run - 1) / run, [] { return 0; },
      [&](int, std::int64_t r) {
        for (std::int64_t i = r * run, end = std::min(count, (r + 1) * run); i < end; ++i) body(i);
      });
}

}  // namespace qkv::kernels

// The kernels' worker threads: every index exactly once, nested and concurrent calls, idle workers
// that sleep instead of spinning, and small problems that stay on the calling thread.

#include <gtest/gtest.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "kernels/operands.hpp"
#include "kernels/workers.hpp"
#include "qkv/attention.hpp"

namespace qkv::kernels {
namespace {

TEST(Workers, EveryIndexExactlyOnce) {
  for (const int threads : {1, 2, 3, 8}) {
    for (const std::int64_t count : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> seen(static_cast<std::size_t>(count));
      parallel_for(threads, count, [&](std::int64_t i) { seen[static_cast<std::size_t>(i)]++; });
      for (std::int64_t i = 0; i < count; ++i)
        EXPECT_EQ(seen[static_cast<std::size_t>(i)].load(), 1) << threads << " " << count;
    }
  }
}

// The look-ahead variant: every index's body runs exactly once; an index that was prepared was
// prepared once, by the thread that then runs it, before it runs; and the last indices (one per
// thread) are never held back, so small counts still reach every thread.
TEST(Workers, LookAheadPreparesOnTheThreadThatRuns) {
  for (const int threads : {1, 2, 3, 8}) {
    for (const std::int64_t count : {0, 1, 2, 5, 17, 1000}) {
      std::vector<std::atomic<int>> ran(static_cast<std::size_t>(count)),
          prepared(static_cast<std::size_t>(count));
      std::atomic<int> misplaced{0};
      parallel_for_each_ahead(
          threads, count, [] { return std::vector<std::int64_t>(); },
          [&](std::vector<std::int64_t>& mine, std::int64_t i) {
            prepared[static_cast<std::size_t>(i)]++;
            mine.push_back(i);
          },
          [&](std::vector<std::int64_t>& mine, std::int64_t i) {
            if (prepared[static_cast<std::size_t>(i)].load() > 0 &&
                std::find(mine.begin(), mine.end(), i) == mine.end())
              misplaced++;
            ran[static_cast<std::size_t>(i)]++;
          });
      for (std::int64_t i = 0; i < count; ++i) {
        EXPECT_EQ(ran[static_cast<std::size_t>(i)].load(), 1) << threads << " " << count;
        EXPECT_LE(prepared[static_cast<std::size_t>(i)].load(), 1) << threads << " " << count;
      }
      EXPECT_EQ(misplaced.load(), 0) << threads << " " << count;
      const std::int64_t workers = std::min<std::int64_t>(threads, count);
      for (std::int64_t i = count - workers; i < count; ++i)
        EXPECT_EQ(prepared[static_cast<std::size_t>(i)].load(), 0) << threads << " " << count;
    }
  }
}

TEST(Workers, EachThreadMakesItsOwnState) {
  std::atomic<int> states{0};
  std::atomic<std::int64_t> total{0};
  parallel_for_each(
      4, 10000,
      [&] {
        states++;
        return std::int64_t{0};
      },
      [&](std::int64_t& mine, std::int64_t i) {
        mine += i;
        total += i;
      });
  EXPECT_EQ(total.load(), 10000 * 9999 / 2);
  EXPECT_GE(states.load(), 1);
  EXPECT_LE(states.load(), 4);
}

TEST(Workers, NestedAndConcurrentCallsFinish) {
  std::atomic<std::int64_t> inner{0};
  parallel_for(2, 8, [&](std::int64_t) {
    parallel_for(2, 100, [&](std::int64_t) { inner++; });  // runs on its caller alone
  });
  EXPECT_EQ(inner.load(), 800);

  std::atomic<std::int64_t> calls{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int round = 0; round < 200; ++round) parallel_for(2, 16, [&](std::int64_t) { calls++; });
    });
  }
  for (std::thread& caller : callers) caller.join();
  EXPECT_EQ(calls.load(), 4 * 200 * 16);
}

double cpu_seconds(pthread_t thread) {
  clockid_t clock{};
  timespec time{};
  if (pthread_getcpuclockid(thread, &clock) != 0 || clock_gettime(clock, &time) != 0) return 0;
  return static_cast<double>(time.tv_sec) + 1e-9 * static_cast<double>(time.tv_nsec);
}

// The property a shared machine needs: once a call has returned, its helpers stop taking CPU
// time within kSpinMicroseconds (OpenMP's default spins for milliseconds after each region).
// Measured on the helper threads themselves (OpenBLAS's own threads spin at start-up).
TEST(Workers, IdleWorkersSleep) {
  // The caller's task waits until a helper has run, so the team stays open until one joins.
  std::mutex mutex;
  std::condition_variable joined;
  std::optional<pthread_t> helper;
  run_on_workers(2, [&](int worker) {
    std::unique_lock<std::mutex> lock(mutex);
    if (worker != 0) {
      helper = pthread_self();
      joined.notify_one();
    } else {
      ASSERT_TRUE(joined.wait_for(lock, std::chrono::seconds(20), [&] {
        return helper.has_value();
      })) << "no helper joined within 20 s";
    }
  });
  ASSERT_TRUE(helper.has_value());
  const double before = cpu_seconds(*helper);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double spent = cpu_seconds(*helper) - before;
  EXPECT_LT(spent, 0.005) << "the helper spun " << spent * 1e3
                          << " ms of CPU while there was no work";
}

TEST(Workers, SmallProblemsStayOnTheCallingThread) {
  detail::AttentionProblem p;
  p.batch = 1;
  p.q_heads = p.kv_heads = 4;
  p.q_len = p.k_len = 32;
  p.q_dim = p.k_dim = p.v_dim = 64;
  EXPECT_EQ(worker_threads(p), 1);  // 0.5 M multiply-adds: one thread
  p.q_len = p.k_len = 1024;
  EXPECT_EQ(worker_threads(p), omp_get_max_threads());
  p.threads = 3;  // the caller's explicit choice stands
  EXPECT_EQ(worker_threads(p), 3);
  p.q_len = p.k_len = 8;
  EXPECT_EQ(worker_threads(p), 3);
}

}  // namespace
}  // namespace qkv::kernels

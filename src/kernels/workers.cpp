// The kernels' worker threads (see workers.hpp): a team is published under a mutex with a new
// generation number; workers notice it by spinning on the number for a while, or sleep on a
// condition variable and are woken, and join while the team is open. The caller works too; when
// its own share is done it closes the team and waits, spinning and then sleeping likewise, for the
// helpers that joined. Work comes from a queue the team shares, so a helper that never joined
// (asleep, or without a core on a busy machine) delays nothing.

#include "kernels/workers.hpp"

#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qkv::kernels {

namespace {

constexpr int kMaxHelpers = 255;  // however many threads a caller asks for

void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until done() holds or kSpinMicroseconds have passed; returns done().
template <class Done>
bool spin_until(Done done) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
  for (int round = 0;; ++round) {
    if (done()) return true;
    relax();
    if (round % 64 == 63 && std::chrono::steady_clock::now() > deadline) return done();
  }
}

class Workers {
 public:
  void Run(int workers, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> team_lock(team_mutex_, std::try_to_lock);
    if (!team_lock.owns_lock()) {  // a call from inside a task, or beside another caller's
      task(0);
      return;
    }
    const int helpers = std::min(workers - 1, kMaxHelpers);
    Grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      helpers_ = helpers;
      open_ = true;
      generation_.fetch_add(1, std::memory_order_release);
      if (sleeping_ > 0) wake_.notify_all();
    }
    try {
      task(0);
    } catch (...) {  // no helper may outlive the call whose state it reads
      Close();
      throw;
    }
    Close();
  }

 private:
  // Closes the team: a helper that has not joined by now (descheduled on a busy machine, or
  // still asleep) finds the work taken and stays out; waits only for those inside the task.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = false;
    }
    if (!spin_until([&] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return active_.load(std::memory_order_acquire) == 0; });
    }
  }

  void Grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      // The thread may start after the team it is grown for is published: it must count that
      // team's generation as new, so it starts from the one before.
      const int index = static_cast<int>(threads_.size()) + 1;
      const std::uint64_t before = generation_.load(std::memory_order_relaxed);
      threads_.emplace_back([this, index, before] { Loop(index, before); });
      threads_.back().detach();  // they live as long as the process (or until a fork)
    }
  }

  void Loop(int index, std::uint64_t seen) {
    for (;;) {
      if (!spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_;
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        --sleeping_;
      }
      const std::function<void(int)>* task = nullptr;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_relaxed);
        if (open_ && index <= helpers_) {  // join the team
          task = task_;
          active_.fetch_add(1, std::memory_order_relaxed);
        }
      }
      if (task == nullptr) continue;  // not in this team, or it has closed
      (*task)(index);
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  std::mutex team_mutex_;  // held by the caller whose team is running
  std::mutex mutex_;       // guards task_, helpers_, open_, sleeping_, joining, publication
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int helpers_ = 0;
  bool open_ = false;  // helpers may still join the current team
  int sleeping_ = 0;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> active_{0};  // helpers inside the current team's task
  std::vector<std::thread> threads_;
};

// The process's workers. Never destroyed: detached threads may still sleep on its members at
// exit. A forked child has none of the parent's threads, so it starts with a fresh set.
std::atomic<Workers*> process_workers{nullptr};

Workers& workers() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { process_workers.store(new Workers); });
    return true;
  }();
  (void)registered;
  Workers* current = process_workers.load();
  if (current == nullptr) {
    auto fresh = std::make_unique<Workers>();
    if (process_workers.compare_exchange_strong(current, fresh.get())) return *fresh.release();
  }
  return *current;
}

}  // namespace

void run_on_workers(int workers_wanted, const std::function<void(int)>& task) {
  if (workers_wanted <= 1) {
    task(0);
    return;
  }
  workers().Run(workers_wanted, task);
}

}  // namespace qkv::kernels

#pragma once
// Worker: one host thread that runs posted jobs, one at a time, in order. Device work it issues
// goes to that thread's own stream (the CUDA backend keeps one stream and one set of library
// handles per host thread), so it overlaps what the posting thread issues meanwhile: e.g. a
// conversation decodes frame t's reply audio here while the caller encodes and steps frame t+1.
// A session (its captured graphs and scratch) must stay with the thread that created it: graphs
// captured on one thread bake in that thread's library workspaces.
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

namespace ttt {

class Worker {
 public:
  Worker() : thread_([this] { loop(); }) {}
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() {
    {
      std::lock_guard<std::mutex> l(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  // Starts `job` on the worker once the previous one has finished.
  void post(std::function<void()> job) {
    wait();
    {
      std::lock_guard<std::mutex> l(mu_);
      job_ = std::move(job);
      busy_ = true;
    }
    cv_.notify_all();
  }
  // Blocks until the posted job has finished; rethrows what it threw.
  void wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !busy_; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }
  // post + wait.
  void run(std::function<void()> job) {
    post(std::move(job));
    wait();
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      cv_.wait(l, [&] { return quit_ || busy_; });
      if (quit_ && !busy_) return;
      auto job = std::move(job_);
      l.unlock();
      std::exception_ptr err;
      try {
        job();
      } catch (...) {
        err = std::current_exception();
      }
      l.lock();
      error_ = err;
      busy_ = false;
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_;
  std::exception_ptr error_;
  bool busy_ = false, quit_ = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

}  // namespace ttt

//! An elastic pool of threads: every job starts at once, on a spare thread
//! if there is one and on a new thread otherwise (Python's `ThreadingMixIn`,
//! with reuse). A thread that has waited [`KEEP_IDLE`] for a job exits unless
//! it is one of the `warm` threads the pool keeps however quiet it gets, so
//! the threads alive follow the jobs live.
//!
//! Jobs go through one queue. A thread that finishes a job takes the next
//! one from the queue; finding none, it yields the CPU once and looks again
//! before it waits, so a job the accept loop queues meanwhile is usually
//! taken by a thread already running (on the 2-core bench machine: 57-60
//! against 65-72 µs of CPU per short connection under threading; why it
//! pays more than the hand-off's share of the profile is not established).
//! The price: a job queued while no thread waits and every spare one is
//! yielding waits for one of those to run again (up to a scheduler time
//! slice on a busy CPU). `execute` wakes a waiting thread whenever one
//! waits (it may find the job taken), and starts a thread only when the
//! queued jobs outnumber the threads not running one (those waiting and
//! those between jobs), outside the pool's lock: a thread start is slow,
//! and threads finishing their jobs must not queue behind it.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long a thread beyond the warm ones waits for a job before it exits.
pub const KEEP_IDLE: Duration = Duration::from_secs(5);

type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued (and when the pool closes).
    work: Condvar,
    /// Signalled when the last job ends (for `join`).
    all_idle: Condvar,
    warm: usize,
    keep_idle: Duration,
    name: String,
    /// Runs first on every new thread (e.g. entering a runtime context).
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
}

struct State {
    queue: VecDeque<Job>,
    /// Threads alive (or being started).
    threads: usize,
    /// Threads running a job.
    busy: usize,
    /// Jobs queued or running.
    jobs: usize,
    /// Threads waiting on `work` for a job.
    waiting: usize,
    /// The pool is being dropped: threads exit once the queue is empty.
    closing: bool,
}

impl Pool {
    /// A pool that keeps `warm` threads (started now) and grows without
    /// bound; the caller bounds the jobs it submits.
    pub(crate) fn new(
        warm: usize,
        name: &str,
        on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Pool {
        Pool::with_keep_idle(warm, KEEP_IDLE, name, on_start)
    }

    /// [`Pool::new`] with threads beyond the warm ones kept `keep_idle`.
    pub(crate) fn with_keep_idle(
        warm: usize,
        keep_idle: Duration,
        name: &str,
        on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Pool {
        let pool = Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    threads: 0,
                    busy: 0,
                    jobs: 0,
                    waiting: 0,
                    closing: false,
                }),
                work: Condvar::new(),
                all_idle: Condvar::new(),
                warm,
                keep_idle,
                name: name.to_string(),
                on_start,
            }),
        };
        for _ in 0..warm {
            pool.shared.lock().threads += 1;
            if !start(&pool.shared) {
                break;
            }
        }
        pool
    }

    /// Runs `job` now: on a spare thread, or on a new one. If no thread can
    /// be started (the system is out of threads), the job waits for the
    /// next thread that finishes one.
    pub(crate) fn execute(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.lock();
        state.queue.push_back(Box::new(job));
        state.jobs += 1;
        let spare = state.threads - state.busy;
        let grow = state.queue.len() > spare;
        if grow {
            state.threads += 1;
        }
        // With no thread waiting, a thread between jobs (it looks at the
        // queue before it waits) takes it.
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.shared.work.notify_one();
        }
        if grow && !start(&self.shared) {
            tracing::warn!("cannot start another worker thread; the connection waits for one");
        }
    }

    /// Threads waiting for a job now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.shared.lock().waiting
    }

    /// Threads alive now.
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Waits until no job is queued or running.
    pub(crate) fn join(&self) {
        let mut state = self.shared.lock();
        while state.jobs > 0 {
            state = self
                .shared
                .all_idle
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts a pool thread, already counted in `threads`; uncounts it and
/// returns false if the system would not start one.
fn start(shared: &Arc<Shared>) -> bool {
    let pool = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(shared.name.clone())
        .spawn(move || {
            if let Some(on_start) = &pool.on_start {
                on_start();
            }
            work(&pool);
        });
    if spawned.is_err() {
        shared.lock().threads -= 1;
        return false;
    }
    true
}

/// A pool thread: takes jobs from the queue, waits for one when it is
/// empty, and exits after [`KEEP_IDLE`] without one (unless warm threads
/// would be missing) or when the pool closes.
fn work(shared: &Shared) {
    let mut state = shared.lock();
    let mut yielded = false;
    loop {
        if let Some(job) = state.queue.pop_front() {
            yielded = false;
            state.busy += 1;
            drop(state);
            // A panicking job must not take the thread's count with it: the
            // job itself reports what it must.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            state = shared.lock();
            state.busy -= 1;
            state.jobs -= 1;
            if state.jobs == 0 {
                shared.all_idle.notify_all();
            }
            continue;
        }
        if state.closing {
            state.threads -= 1;
            return;
        }
        if !yielded {
            // Look once more, after a yield, before sleeping: a connection
            // the accept loop queues meanwhile is taken without this thread
            // sleeping and being woken for it (see the module's doc).
            yielded = true;
            drop(state);
            std::thread::yield_now();
            state = shared.lock();
            continue;
        }
        state.waiting += 1;
        let (guard, waited) = shared
            .work
            .wait_timeout(state, shared.keep_idle)
            .unwrap_or_else(|e| e.into_inner());
        state = guard;
        state.waiting -= 1;
        if waited.timed_out() && state.queue.is_empty() && state.threads > shared.warm {
            state.threads -= 1;
            let last_of_a_burst = state.threads == shared.warm;
            drop(state);
            if last_of_a_burst {
                // What the exited threads' arenas held goes back.
                crate::sys::resources::trim_allocator();
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    /// Every job starts at once, however many are running: 50 jobs that
    /// each wait for all the others finish, on a pool of 2 warm threads.
    #[test]
    fn every_job_starts_at_once() {
        let pool = Pool::new(2, "test-pool", None);
        let all = Arc::new(Barrier::new(51));
        for _ in 0..50 {
            let all = all.clone();
            pool.execute(move || {
                all.wait();
            });
        }
        all.wait();
        pool.join();
        assert!(pool.threads() >= 50);
    }

    /// Threads are reused, and those beyond the warm ones exit once idle.
    #[test]
    fn idle_threads_beyond_the_warm_ones_exit() {
        let pool = Pool::with_keep_idle(3, Duration::from_millis(100), "test-pool", None);
        let all = Arc::new(Barrier::new(21));
        for _ in 0..20 {
            let all = all.clone();
            pool.execute(move || {
                all.wait();
            });
        }
        all.wait();
        pool.join();
        assert!(pool.threads() >= 20);
        // One at a time: most of the threads stay idle.
        for _ in 0..10 {
            pool.execute(|| {});
            pool.join();
        }
        let _ = harness::poll(Duration::from_secs(10), || match pool.threads() {
            3 => Ok(()),
            n => Err(n),
        });
        assert_eq!(pool.threads(), 3);
    }

    /// A job queued while every thread waits wakes one: threads asleep on
    /// the queue are not left sleeping.
    #[test]
    fn a_job_wakes_a_waiting_thread() {
        // Waits that do not time out in the test's time.
        let pool = Pool::with_keep_idle(2, Duration::from_secs(600), "test-pool", None);
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..50 {
            // Both threads asleep on the queue, none between jobs.
            let asleep = harness::poll(Duration::from_secs(10), || match pool.waiting() {
                2 => Ok(()),
                n => Err(n),
            });
            assert_eq!(asleep, Ok(()), "the pool's threads never all waited");
            let tx = tx.clone();
            pool.execute(move || tx.send(i).unwrap());
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(i));
        }
        pool.join();
    }

    /// A job that panics costs neither its thread's count nor `join`.
    #[test]
    fn a_panicking_job_leaves_the_pool_consistent() {
        let pool = Pool::new(1, "test-pool", None);
        pool.execute(|| panic!("a job panicked (expected by the test)"));
        pool.join();
        let (tx, rx) = std::sync::mpsc::channel();
        pool.execute(move || tx.send(7).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(7));
        pool.join();
    }
}

#[cfg(test)]
mod stress {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// As the accept loop submits: never more than 32 jobs in flight. The
    /// pool then never needs more than 32 threads, however many jobs pass.
    #[test]
    fn threads_stay_within_the_jobs_in_flight() {
        let pool = Pool::new(8, "stress", None);
        let in_flight = Arc::new((Mutex::new(0usize), Condvar::new()));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..50_000 {
            {
                let (count, freed) = &*in_flight;
                let mut count = count.lock().unwrap();
                while *count >= 32 {
                    count = freed.wait(count).unwrap();
                }
                *count += 1;
            }
            let in_flight = in_flight.clone();
            let done = done.clone();
            pool.execute(move || {
                done.fetch_add(1, Ordering::Relaxed);
                let (count, freed) = &*in_flight;
                *count.lock().unwrap() -= 1;
                freed.notify_one();
            });
        }
        pool.join();
        assert_eq!(done.load(Ordering::Relaxed), 50_000);
        assert!(pool.threads() <= 64, "{} threads", pool.threads());
    }
}

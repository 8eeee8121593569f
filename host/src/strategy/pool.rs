//! An elastic pool of threads: every job starts at once, on an idle thread
//! if one is waiting and on a new thread otherwise (Python's
//! `ThreadingMixIn`, with reuse). A thread that has been idle for
//! [`KEEP_IDLE`] exits unless it is one of the `warm` threads the pool keeps
//! however quiet it gets, so the threads alive follow the jobs live.
//!
//! Idle threads wait on a stack: the thread that finished last is handed the
//! next job (its stack and caches are hot), and the threads at the bottom
//! are the ones that time out.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long a thread beyond the warm ones waits for a job before it exits.
pub const KEEP_IDLE: Duration = Duration::from_secs(5);

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the last running job ends (for `join`).
    all_idle: Condvar,
    warm: usize,
    keep_idle: Duration,
    name: String,
    /// Runs first on every new thread (e.g. entering a runtime context).
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
}

struct State {
    /// Idle threads, most recently idle last.
    idle: Vec<Arc<Idle>>,
    /// Threads alive.
    threads: usize,
    /// Jobs running.
    running: usize,
    /// The pool is being dropped: idle threads exit.
    closing: bool,
    /// Jobs that found no thread (only when thread creation fails), taken
    /// by the next thread that finishes a job.
    queued: VecDeque<Job>,
}

/// One idle thread's hand-off: a job is put here (under the pool's lock)
/// and the thread woken.
struct Idle {
    job: Mutex<Option<Job>>,
    ready: Condvar,
}

impl Pool {
    /// A pool that keeps `warm` threads (started now) and grows without
    /// bound; the caller bounds the jobs it submits.
    pub fn new(warm: usize, name: &str, on_start: Option<Arc<dyn Fn() + Send + Sync>>) -> Pool {
        Pool::with_keep_idle(warm, KEEP_IDLE, name, on_start)
    }

    /// [`Pool::new`] with threads beyond the warm ones kept `keep_idle`.
    pub fn with_keep_idle(
        warm: usize,
        keep_idle: Duration,
        name: &str,
        on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Pool {
        let pool = Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    idle: Vec::new(),
                    threads: 0,
                    running: 0,
                    closing: false,
                    queued: VecDeque::new(),
                }),
                all_idle: Condvar::new(),
                warm,
                keep_idle,
                name: name.to_string(),
                on_start,
            }),
        };
        for _ in 0..warm {
            let mut state = pool.shared.lock();
            if start(&pool.shared, &mut state, None).is_err() {
                break;
            }
        }
        pool
    }

    /// Runs `job` now: on the most recently idle thread, or on a new one.
    /// If no thread can be started (the system is out of threads), the job
    /// waits for the next thread that becomes idle.
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let mut state = self.shared.lock();
        state.running += 1;
        if let Some(idle) = state.idle.pop() {
            *idle.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
            idle.ready.notify_one();
            return;
        }
        if let Err(job) = start(&self.shared, &mut state, Some(job)) {
            // No new thread: queue it behind the running ones. A thread that
            // finishes takes it before it goes idle.
            tracing::warn!("cannot start another worker thread; the connection waits for one");
            state.queued.extend(job);
        }
    }

    /// Threads alive now.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Waits until no job is running.
    pub fn join(&self) {
        let mut state = self.shared.lock();
        while state.running > 0 {
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
        let mut state = self.shared.lock();
        state.closing = true;
        for idle in state.idle.drain(..) {
            idle.ready.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts a thread that first runs `job` (if any); gives the job back if
/// no thread could be started.
fn start(shared: &Arc<Shared>, state: &mut State, job: Option<Job>) -> Result<(), Option<Job>> {
    // The job travels in a slot the thread empties, so a failed spawn gives
    // it back.
    let slot = Arc::new(Mutex::new(job));
    let theirs = slot.clone();
    let pool = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(shared.name.clone())
        .spawn(move || {
            if let Some(on_start) = &pool.on_start {
                on_start();
            }
            let first = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
            work(&pool, first);
        });
    match spawned {
        Ok(_) => {
            state.threads += 1;
            Ok(())
        }
        Err(_) => Err(slot.lock().unwrap_or_else(|e| e.into_inner()).take()),
    }
}

/// A pool thread: runs its job, then waits on the idle stack for the next
/// one, and exits after [`KEEP_IDLE`] without one (unless warm ones would be
/// missing) or when the pool closes.
fn work(shared: &Shared, mut job: Option<Job>) {
    loop {
        if let Some(run) = job.take() {
            // A panicking job must not take the thread's count with it: the
            // job itself catches what it must report; this keeps the pool
            // consistent.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
            let mut state = shared.lock();
            state.running -= 1;
            if state.running == 0 {
                shared.all_idle.notify_all();
            }
            if let Some(queued) = state.queued.pop_front() {
                job = Some(queued);
                continue;
            }
        }
        let idle = Arc::new(Idle {
            job: Mutex::new(None),
            ready: Condvar::new(),
        });
        let mut state = shared.lock();
        if state.closing {
            state.threads -= 1;
            return;
        }
        state.idle.push(idle.clone());
        drop(state);
        let mut slot = idle.job.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(next) = slot.take() {
                job = Some(next);
                break;
            }
            let (guard, waited) = idle
                .ready
                .wait_timeout(slot, shared.keep_idle)
                .unwrap_or_else(|e| e.into_inner());
            slot = guard;
            if slot.is_some() {
                continue;
            }
            // Retire if still on the stack (not claimed meanwhile) and more
            // than the warm threads are alive, or the pool is closing. The
            // pool's lock comes first, as in `execute`.
            drop(slot);
            let mut state = shared.lock();
            let position = state.idle.iter().position(|i| Arc::ptr_eq(i, &idle));
            let retire = state.closing || (waited.timed_out() && state.threads > shared.warm);
            match position {
                Some(at) if retire => {
                    state.idle.remove(at);
                    state.threads -= 1;
                    let last_of_a_burst = state.threads == shared.warm;
                    drop(state);
                    if last_of_a_burst {
                        // What the exited threads' arenas held goes back.
                        super::trim_allocator();
                    }
                    return;
                }
                _ => {}
            }
            drop(state);
            slot = idle.job.lock().unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Instant;

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
        // One at a time: the most recently idle thread takes each job.
        for _ in 0..10 {
            pool.execute(|| {});
            pool.join();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.threads() > 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pool.threads(), 3);
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

//! The queue between callers and the pool's threads: one FIFO per user,
//! served round robin, and a cap on how many calls of one user run at once.
//!
//! A user's call counts as running from the moment a thread takes it until
//! the thread really finishes it ([`FairQueue::done`]), not until its caller
//! stops waiting: a call that ignores its timeout (blocked in C, where
//! CPython's asynchronous exception cannot reach it) keeps counting against
//! its own user, so one user's stuck calls never hold more than that user's
//! cap of threads, and the other users are served by the rest.
//!
//! Pure Rust and generic over the job type so the policy is tested without
//! an interpreter (see the tests at the bottom).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug)]
struct State<J> {
    /// Queued jobs of each user that has any.
    queues: HashMap<Arc<str>, VecDeque<J>>,
    /// Users with queued jobs, in the order they are served next.
    ring: VecDeque<Arc<str>>,
    /// Calls of each user taken by a thread and not yet done.
    running: HashMap<Arc<str>, usize>,
    closed: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct FairQueue<J> {
    state: Mutex<State<J>>,
    /// Signalled when a job may have become takeable (a push, a done).
    ready: Condvar,
    /// Most calls of one user running at once.
    cap: usize,
}

/// A queued job whose caller no longer waits for it (timed out, left):
/// dropped from its user's queue at the next push, so a user whose calls
/// wait behind their own stuck ones cannot pile up abandoned jobs.
pub(crate) trait Stale {
    /// Whether nobody waits for this job any more.
    fn is_stale(&self) -> bool;
}

/// The queue was closed: the job was not queued.
#[derive(Debug)]
pub(crate) struct Closed<J>(pub(crate) J);

impl<J: Stale> FairQueue<J> {
    /// A queue letting at most `cap` calls of one user run at once.
    pub(crate) fn new(cap: usize) -> Self {
        FairQueue {
            state: Mutex::new(State {
                queues: HashMap::new(),
                ring: VecDeque::new(),
                running: HashMap::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<J>> {
        self.state.lock().expect("fair queue poisoned")
    }

    /// Queues `job` behind `user`'s earlier jobs.
    pub(crate) fn push(&self, user: &Arc<str>, job: J) -> Result<(), Closed<J>> {
        let mut s = self.lock();
        if s.closed {
            return Err(Closed(job));
        }
        match s.queues.get_mut(user) {
            Some(q) => {
                q.retain(|j| !j.is_stale());
                q.push_back(job);
            }
            None => {
                s.queues.insert(user.clone(), VecDeque::from([job]));
                s.ring.push_back(user.clone());
            }
        }
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for the next job of the first user in the ring who is under
    /// the cap, and counts it as running for that user (call
    /// [`done`](Self::done) when it really ends). `None` once closed.
    pub(crate) fn take(&self) -> Option<(Arc<str>, J)> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(taken) = Self::take_locked(&mut s, self.cap) {
                return Some(taken);
            }
            s = self.ready.wait(s).expect("fair queue poisoned");
        }
    }

    fn take_locked(s: &mut State<J>, cap: usize) -> Option<(Arc<str>, J)> {
        for _ in 0..s.ring.len() {
            let user = s.ring.pop_front()?;
            let running = s.running.get(&user).copied().unwrap_or(0);
            if running >= cap {
                s.ring.push_back(user);
                continue;
            }
            let queue = s.queues.get_mut(&user).expect("a user in the ring has a queue");
            let job = queue.pop_front().expect("a queue in the ring is not empty");
            if queue.is_empty() {
                s.queues.remove(&user);
            } else {
                s.ring.push_back(user.clone());
            }
            *s.running.entry(user.clone()).or_insert(0) += 1;
            return Some((user, job));
        }
        None
    }

    /// A job of `user` that [`take`](Self::take) handed out has ended.
    pub(crate) fn done(&self, user: &Arc<str>) {
        let mut s = self.lock();
        if let Some(n) = s.running.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                s.running.remove(user);
            }
        }
        let waiting = s.queues.contains_key(user);
        drop(s);
        if waiting {
            self.ready.notify_one();
        }
    }

    /// Calls of `user` running now (taken and not done).
    #[cfg(test)]
    pub(crate) fn running(&self, user: &str) -> usize {
        self.lock().running.get(user).copied().unwrap_or(0)
    }

    /// Wakes every waiting thread with `None`; later pushes fail. Jobs
    /// still queued are dropped (their callers see the reply channel close).
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.queues.clear();
        s.ring.clear();
        drop(s);
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    impl Stale for i32 {
        fn is_stale(&self) -> bool {
            *self < 0
        }
    }

    impl Stale for (&str, i32) {
        fn is_stale(&self) -> bool {
            false
        }
    }

    #[test]
    fn users_are_served_round_robin() {
        let q = FairQueue::new(100);
        let (a, b, c) = (name("a"), name("b"), name("c"));
        for i in 0..3 {
            q.push(&a, ("a", i)).unwrap();
        }
        q.push(&b, ("b", 0)).unwrap();
        q.push(&c, ("c", 0)).unwrap();
        q.push(&b, ("b", 1)).unwrap();
        let order: Vec<_> = (0..6).map(|_| q.take().unwrap().1).collect();
        assert_eq!(order, [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2)]);
    }

    #[test]
    fn a_user_at_the_cap_is_skipped_until_one_of_its_calls_is_done() {
        let q = FairQueue::new(2);
        let (a, b) = (name("a"), name("b"));
        for i in 0..4 {
            q.push(&a, i).unwrap();
        }
        assert_eq!(q.take().unwrap().1, 0);
        assert_eq!(q.take().unwrap().1, 1);
        assert_eq!(q.running("a"), 2);
        q.push(&b, 100).unwrap();
        // a is at its cap: b is served even though a queued first.
        assert_eq!(q.take().unwrap(), (b.clone(), 100));
        q.done(&b);
        // Nothing takeable now: a thread waits until one of a's calls ends.
        let q = Arc::new(q);
        let waiter = {
            let q = q.clone();
            std::thread::spawn(move || q.take().map(|(_, j)| j))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "took a job over the cap");
        q.done(&a);
        assert_eq!(waiter.join().unwrap(), Some(2));
        assert_eq!(q.running("a"), 2);
    }

    #[test]
    fn a_call_counts_until_done_not_until_taken_again() {
        let q = FairQueue::new(1);
        let a = name("a");
        q.push(&a, 1).unwrap();
        q.push(&a, 2).unwrap();
        assert_eq!(q.take().unwrap().1, 1);
        // The first call is stuck (never done): the second never runs, however
        // many threads ask.
        let q = Arc::new(q);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || q.take().map(|(_, j)| j))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert!(waiters.iter().all(|w| !w.is_finished()));
        q.close();
        for w in waiters {
            assert_eq!(w.join().unwrap(), None);
        }
        assert!(matches!(q.push(&a, 3), Err(Closed(3))));
    }

    #[test]
    fn abandoned_jobs_are_dropped_when_their_user_pushes_again() {
        let q = FairQueue::new(1);
        let a = name("a");
        q.push(&a, 1).unwrap();
        assert_eq!(q.take().unwrap().1, 1); // stuck: a is at its cap from now on
        for i in 0..1000 {
            q.push(&a, -i - 1).unwrap(); // each waits, times out, is abandoned
        }
        q.push(&a, 7).unwrap();
        assert_eq!(q.lock().queues["a"].len(), 1, "abandoned jobs piled up");
        q.done(&a);
        assert_eq!(q.take().unwrap().1, 7);
    }
}

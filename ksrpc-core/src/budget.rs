//! The memory budget of bytes in flight: requests being read and decoded,
//! and replies waiting to be sent, on every transport, bounded per user and
//! server-wide.
//!
//! A transport holds a [`Reservation`] for what one request (or one socket)
//! buffers and resizes it as that grows and shrinks; dropping it gives the
//! bytes back. A resize past either bound fails with a [`BudgetError`], which
//! a transport answers with 503 (HTTP) or by not reading more (WebSocket),
//! never by allocating: one user's uploads cannot take the memory the
//! others need, and all users together cannot take the machine's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Server-wide and per-user bounds of bytes in flight.
#[derive(Debug)]
pub struct MemoryBudget {
    total_limit: u64,
    per_user_limit: u64,
    used: Mutex<Used>,
}

#[derive(Debug, Default)]
struct Used {
    total: u64,
    per_user: HashMap<Arc<str>, u64>,
}

/// Which bound a reservation would have passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// The user's own bytes in flight would pass `limit`.
    #[error("this user already has {used} bytes of requests and replies in flight; the limit is {limit} (limits.max_inflight_bytes_per_user)")]
    User {
        /// Bytes the user has in flight now.
        used: u64,
        /// The per-user bound.
        limit: u64,
    },
    /// Everyone's bytes in flight would pass `limit`.
    #[error("the server has {used} bytes of requests and replies in flight; the limit is {limit} (limits.max_inflight_bytes); retry shortly")]
    Server {
        /// Bytes in flight now.
        used: u64,
        /// The server-wide bound.
        limit: u64,
    },
}

impl MemoryBudget {
    /// A budget of `total_limit` bytes server-wide and `per_user_limit`
    /// bytes for each user.
    pub fn new(total_limit: u64, per_user_limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget { total_limit, per_user_limit, used: Mutex::default() })
    }

    /// A budget that refuses nothing; for tests and embedders that bound
    /// memory elsewhere.
    pub fn unlimited() -> Arc<MemoryBudget> {
        MemoryBudget::new(u64::MAX, u64::MAX)
    }

    /// An empty reservation for `user`, to be resized as bytes arrive.
    pub fn reservation(self: &Arc<Self>, user: &str) -> Reservation {
        Reservation { budget: self.clone(), user: Arc::from(user), bytes: 0 }
    }

    /// Bytes in flight server-wide.
    pub fn used(&self) -> u64 {
        self.used.lock().expect("budget poisoned").total
    }

    /// Bytes in flight for `user`.
    pub fn used_by(&self, user: &str) -> u64 {
        self.used.lock().expect("budget poisoned").per_user.get(user).copied().unwrap_or(0)
    }

    fn resize(&self, user: &Arc<str>, from: u64, to: u64, force: bool) -> Result<(), BudgetError> {
        let mut used = self.used.lock().expect("budget poisoned");
        let mine = used.per_user.get(user).copied().unwrap_or(0);
        if to > from && !force {
            let grow = to - from;
            if mine.saturating_add(grow) > self.per_user_limit {
                return Err(BudgetError::User { used: mine, limit: self.per_user_limit });
            }
            if used.total.saturating_add(grow) > self.total_limit {
                return Err(BudgetError::Server { used: used.total, limit: self.total_limit });
            }
        }
        let mine = mine - from + to;
        used.total = used.total - from + to;
        if mine == 0 {
            used.per_user.remove(user);
        } else {
            used.per_user.insert(user.clone(), mine);
        }
        Ok(())
    }
}

/// Bytes held against a [`MemoryBudget`] for one user; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    user: Arc<str>,
    bytes: u64,
}

impl Reservation {
    /// Holds `bytes` from now on (more or fewer than before). Growing past
    /// a bound fails and keeps the reservation as it was.
    pub fn resize(&mut self, bytes: u64) -> Result<(), BudgetError> {
        self.budget.resize(&self.user, self.bytes, bytes, false)?;
        self.bytes = bytes;
        Ok(())
    }

    /// Holds `bytes` whatever the bounds: for bytes that already exist
    /// (a frame just read), so the count stays true; callers then stop
    /// taking more until it shrinks.
    pub fn force(&mut self, bytes: u64) {
        self.budget.resize(&self.user, self.bytes, bytes, true).expect("a forced resize cannot fail");
        self.bytes = bytes;
    }

    /// Whether `more` bytes on top of what is held would fit now.
    pub fn has_room_for(&self, more: u64) -> bool {
        let used = self.budget.used.lock().expect("budget poisoned");
        let mine = used.per_user.get(&self.user).copied().unwrap_or(0);
        mine.saturating_add(more) <= self.budget.per_user_limit
            && used.total.saturating_add(more) <= self.budget.total_limit
    }

    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let _ = self.budget.resize(&self.user, self.bytes, 0, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_per_user_and_in_total_and_given_back_on_drop() {
        let budget = MemoryBudget::new(100, 60);
        let mut a = budget.reservation("a");
        a.resize(60).unwrap();
        assert_eq!(a.resize(61), Err(BudgetError::User { used: 60, limit: 60 }));
        assert_eq!(a.bytes(), 60, "a failed resize keeps what was held");
        let mut b = budget.reservation("b");
        assert_eq!(b.resize(41), Err(BudgetError::Server { used: 60, limit: 100 }));
        b.resize(40).unwrap();
        assert!(!b.has_room_for(1));
        // shrinking always works and frees room for others
        a.resize(10).unwrap();
        assert!(b.has_room_for(20));
        let mut a2 = budget.reservation("a");
        a2.resize(50).unwrap();
        assert_eq!(budget.used_by("a"), 60);
        drop(a);
        drop(a2);
        assert_eq!((budget.used_by("a"), budget.used()), (0, 40));
        // forced growth passes the bounds but is counted
        b.force(150);
        assert_eq!(budget.used(), 150);
        assert!(!budget.reservation("c").has_room_for(1));
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}

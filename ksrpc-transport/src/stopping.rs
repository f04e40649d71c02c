//! The server's "stopping" flag, seen by every connection: once set, a
//! WebSocket closes (1001, going away) as soon as it has no call and no
//! reply in flight, and every HTTP reply carries `Connection: close`. Calls
//! already running are left to finish, and replies being sent arrive whole;
//! the server then exits without waiting out its grace for sockets that
//! would never close by themselves (an idle WebSocket).

use tokio::sync::watch;

/// Seen by connections: whether the server is stopping.
#[derive(Clone, Debug)]
pub struct Stopping(watch::Receiver<bool>);

/// Held by whoever stops the server: sets the flag of its [`Stopping`].
#[derive(Clone, Debug)]
pub struct StopTrigger(std::sync::Arc<watch::Sender<bool>>);

impl Stopping {
    /// A flag not set yet, and the trigger that sets it.
    pub fn new() -> (StopTrigger, Stopping) {
        let (tx, rx) = watch::channel(false);
        (StopTrigger(std::sync::Arc::new(tx)), Stopping(rx))
    }

    /// A flag nobody can set (for embedders that stop the server otherwise).
    pub fn never() -> Stopping {
        Stopping(watch::channel(false).1)
    }

    /// Whether the server is stopping now.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the server is stopping (never, if it cannot be).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl StopTrigger {
    /// Sets the flag; connections see it at once.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_trigger_wakes_every_waiter_and_stays_set() {
        let (trigger, stopping) = Stopping::new();
        assert!(!stopping.is_set());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = stopping.clone();
                tokio::spawn(async move { s.wait().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        trigger.trigger();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w).await.unwrap().unwrap();
        }
        assert!(stopping.is_set());
        // A waiter that comes later returns at once.
        tokio::time::timeout(Duration::from_secs(5), stopping.wait()).await.unwrap();
    }

    #[tokio::test]
    async fn never_is_never_set() {
        let stopping = Stopping::never();
        assert!(!stopping.is_set());
        assert!(tokio::time::timeout(Duration::from_millis(50), stopping.wait()).await.is_err());
    }
}

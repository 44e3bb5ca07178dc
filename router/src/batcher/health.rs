//! Readiness of the shards as the batching task sees it, readable from anywhere.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Connecting to the shards or warming up.
    Starting,
    Ready,
    /// A shard failed; the reason names it.
    Down(String),
}

/// A read handle on the current [`Health`].
#[derive(Debug, Clone)]
pub struct HealthState {
    rx: watch::Receiver<Health>,
}

/// The writing side: the health checker and the batching task (on a failed step).
#[derive(Debug, Clone)]
pub struct HealthReporter {
    tx: Arc<watch::Sender<Health>>,
}

pub fn health_channel() -> (HealthReporter, HealthState) {
    let (tx, rx) = watch::channel(Health::Starting);
    (HealthReporter { tx: Arc::new(tx) }, HealthState { rx })
}

impl HealthState {
    pub fn current(&self) -> Health {
        self.rx.borrow().clone()
    }

    pub fn is_ready(&self) -> bool {
        matches!(*self.rx.borrow(), Health::Ready)
    }

    /// Why the server is not ready ("" when it is).
    pub fn reason(&self) -> String {
        match &*self.rx.borrow() {
            Health::Starting => "the shards are starting".into(),
            Health::Ready => String::new(),
            Health::Down(reason) => reason.clone(),
        }
    }
}

impl HealthReporter {
    pub fn set(&self, health: Health) {
        self.tx.send_if_modified(|current| {
            if *current == health {
                false
            } else {
                *current = health;
                true
            }
        });
    }
}

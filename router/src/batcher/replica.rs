//! One replica (an independent shard group with its own batching task) as the
//! dispatcher sees it: where its entries go, its health, and how loaded it is.
//!
//! The batching task owns its queue, batch and KV blocks; after every step and
//! admission it publishes a [`Load`] snapshot on a `watch` channel, which the
//! dispatcher reads without waiting on the task. Requests dispatched but not
//! yet taken off the channel by the task are counted on the dispatcher's side
//! (monotonic counters, compared with the task's own), so a burst of requests
//! arriving during one long shard step does not all land on the same replica.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::IntCounter;
use tokio::sync::{mpsc, watch};

use super::{Entry, HealthState};

/// What a batching task publishes about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// KV blocks not held by running requests.
    pub free_blocks: u64,
    /// Blocks the waiting requests will take when admitted.
    pub queued_blocks: u64,
    /// Requests waiting for prefill.
    pub queued: u64,
    /// Requests in the running batch.
    pub running: u64,
    /// Requests the task has taken from its channel, ever.
    pub received: u64,
    /// Their blocks ([`blocks_for`] of prompt + `max_new_tokens`), ever.
    pub received_blocks: u64,
}

/// Blocks of `block_size` tokens that hold `tokens` positions (the one
/// formula the dispatcher and the batching task share).
pub fn blocks_for(tokens: u64, block_size: u32) -> u64 {
    tokens.div_ceil(u64::from(block_size.max(1)))
}

/// The replica's batching task no longer takes entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batching task has stopped")]
pub struct TaskStopped;

/// A replica's standing for the next request (see [`super::choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its shards answer and its batching task runs.
    pub ready: bool,
    /// Free KV tokens less those its waiting (and in-transit) requests will take;
    /// negative when more is queued than is free.
    pub available_tokens: i64,
    /// Requests waiting, in transit or running.
    pub requests: u64,
}

/// The dispatcher's handle on one replica.
#[derive(Debug)]
pub struct Replica {
    index: usize,
    entries: mpsc::UnboundedSender<Entry>,
    health: HealthState,
    load: watch::Receiver<Load>,
    block_size: u32,
    dispatched: AtomicU64,
    dispatched_blocks: AtomicU64,
    requests: Option<IntCounter>,
}

impl Replica {
    /// Replica `index`, fed through `entries`, whose batching task publishes
    /// `load` and allocates blocks of `block_size` tokens.
    pub fn new(
        index: usize,
        entries: mpsc::UnboundedSender<Entry>,
        health: HealthState,
        load: watch::Receiver<Load>,
        block_size: u32,
    ) -> Self {
        Self {
            index,
            entries,
            health,
            load,
            block_size: block_size.max(1),
            dispatched: AtomicU64::new(0),
            dispatched_blocks: AtomicU64::new(0),
            requests: None,
        }
    }

    /// Counts every dispatched request on `counter`
    /// (`tessera_replica_requests_total{replica}`).
    pub fn with_counter(mut self, counter: IntCounter) -> Self {
        self.requests = Some(counter);
        self
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn health(&self) -> &HealthState {
        &self.health
    }

    /// Whether it can take requests: its shards answer and its task runs.
    pub fn is_ready(&self) -> bool {
        self.health.is_ready() && !self.entries.is_closed()
    }

    /// Why it cannot take requests ("" when it can).
    pub fn unready_reason(&self) -> String {
        if self.entries.is_closed() {
            TaskStopped.to_string()
        } else {
            self.health.reason()
        }
    }

    /// Blocks a request of `tokens` positions (prompt + `max_new_tokens`) takes here.
    pub fn blocks_for(&self, tokens: u64) -> u64 {
        blocks_for(tokens, self.block_size)
    }

    /// Its standing now: the last published load plus what is in transit.
    pub fn candidate(&self) -> Candidate {
        let load = *self.load.borrow();
        let in_transit = self
            .dispatched
            .load(Ordering::Relaxed)
            .saturating_sub(load.received);
        let in_transit_blocks = self
            .dispatched_blocks
            .load(Ordering::Relaxed)
            .saturating_sub(load.received_blocks);
        let reserved = load.queued_blocks.saturating_add(in_transit_blocks);
        let available_blocks = i128::from(load.free_blocks) - i128::from(reserved);
        let available_tokens = available_blocks * i128::from(self.block_size);
        Candidate {
            ready: self.is_ready(),
            available_tokens: available_tokens.clamp(i64::MIN.into(), i64::MAX.into()) as i64,
            requests: load
                .queued
                .saturating_add(load.running)
                .saturating_add(in_transit),
        }
    }

    /// Hands `entry` (which needs `blocks` here) to the batching task.
    pub fn send(&self, entry: Entry, blocks: u64) -> Result<(), TaskStopped> {
        // Counted before the task can see it, so that `received` never runs ahead.
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        self.dispatched_blocks.fetch_add(blocks, Ordering::Relaxed);
        self.entries.send(entry).map_err(|_| TaskStopped)?;
        if let Some(counter) = &self.requests {
            counter.inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::testing::entry;
    use crate::batcher::{health_channel, Health};

    #[test]
    fn requests_in_transit_count_until_the_task_reports_them() {
        let (reporter, health) = health_channel();
        reporter.set(Health::Ready);
        let (load_tx, load_rx) = watch::channel(Load {
            free_blocks: 10,
            ..Load::default()
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let replica = Replica::new(0, tx, health, load_rx, 16);
        assert_eq!(
            replica.candidate(),
            Candidate {
                ready: true,
                available_tokens: 160,
                requests: 0
            }
        );
        // 20 + 12 positions: 2 blocks of 16.
        assert_eq!(replica.blocks_for(32), 2);
        replica.send(entry(20, 12), 2).unwrap();
        let c = replica.candidate();
        assert_eq!((c.available_tokens, c.requests), (8 * 16, 1));
        // The task takes it off the channel and queues it: counted once, not twice.
        assert!(rx.try_recv().is_ok());
        load_tx.send_replace(Load {
            free_blocks: 10,
            queued_blocks: 2,
            queued: 1,
            running: 0,
            received: 1,
            received_blocks: 2,
        });
        let c = replica.candidate();
        assert_eq!((c.available_tokens, c.requests), (8 * 16, 1));
        // Oversubscribed: negative, not wrapped.
        load_tx.send_replace(Load {
            free_blocks: 0,
            queued_blocks: 3,
            queued: 1,
            running: 2,
            received: 1,
            received_blocks: 2,
        });
        assert_eq!(replica.candidate().available_tokens, -3 * 16);
    }

    #[test]
    fn a_stopped_task_or_a_down_group_is_not_ready() {
        let (reporter, health) = health_channel();
        let (_load_tx, load_rx) = watch::channel(Load::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let replica = Replica::new(3, tx, health, load_rx, 16);
        assert!(!replica.is_ready(), "starting");
        assert_eq!(replica.unready_reason(), "the shards are starting");
        reporter.set(Health::Down("rank 0 died".into()));
        assert_eq!(replica.unready_reason(), "rank 0 died");
        reporter.set(Health::Ready);
        assert!(replica.is_ready());
        drop(rx);
        assert!(!replica.is_ready());
        assert_eq!(replica.unready_reason(), "the batching task has stopped");
        assert!(replica.send(entry(1, 1), 1).is_err());
    }
}

//! Data parallelism: which replica (shard group) serves a new request. A
//! request stays on the replica it was sent to for its whole life; the choice
//! is made once, from each replica's published load, without waiting on any
//! batching task.

use tracing::debug;

use super::replica::{Candidate, Replica};
use super::Entry;
use crate::infer::InferError;

/// The replica for the next request: of the ready ones, the one with the most
/// available KV capacity; ties go to the one with the fewest requests, then to
/// the lowest index. `None` when no replica is ready.
pub fn choose(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ready)
        .max_by(|(i, a), (j, b)| {
            a.available_tokens
                .cmp(&b.available_tokens)
                .then(b.requests.cmp(&a.requests))
                .then(j.cmp(i))
        })
        .map(|(i, _)| i)
}

/// Every replica the router serves, in `--shard-uri` order.
#[derive(Debug)]
pub struct Replicas {
    list: Vec<Replica>,
}

impl Replicas {
    pub fn new(list: Vec<Replica>) -> Self {
        Self { list }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Replica> {
        self.list.iter()
    }

    /// The server is ready while at least one replica is: the others' requests
    /// go to it, so a load balancer should keep sending traffic.
    pub fn is_ready(&self) -> bool {
        self.list.iter().any(Replica::is_ready)
    }

    /// Why no replica can take requests ("" when one can). With one replica,
    /// its own reason, as before replicas existed.
    pub fn reason(&self) -> String {
        match self.list.as_slice() {
            [] => "no shard group is configured".into(),
            [only] => only.unready_reason(),
            list if list.iter().any(Replica::is_ready) => String::new(),
            list => {
                let each: Vec<String> = list
                    .iter()
                    .map(|r| format!("replica {}: {}", r.index(), r.unready_reason()))
                    .collect();
                format!("no replica is ready ({})", each.join("; "))
            }
        }
    }

    /// Sends `entry` to the replica [`choose`] picks and returns its index;
    /// `Unavailable` when none is ready.
    pub fn dispatch(&self, entry: Entry) -> Result<usize, InferError> {
        let candidates: Vec<Candidate> = self.list.iter().map(Replica::candidate).collect();
        let Some(chosen) = choose(&candidates) else {
            return Err(InferError::Unavailable(self.reason()));
        };
        let replica = &self.list[chosen];
        let request = &entry.request;
        let tokens = request.input_ids.len() as u64 + u64::from(request.stopping.max_new_tokens);
        let blocks = replica.blocks_for(tokens);
        replica
            .send(entry, blocks)
            .map_err(|e| InferError::Unavailable(e.to_string()))?;
        debug!(replica = chosen, blocks, "dispatched");
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::batcher::testing::entry;
    use crate::batcher::{health_channel, Health, HealthReporter, Load};

    fn c(ready: bool, available_tokens: i64, requests: u64) -> Candidate {
        Candidate {
            ready,
            available_tokens,
            requests,
        }
    }

    #[test]
    fn most_available_capacity_wins() {
        assert_eq!(
            choose(&[c(true, 100, 0), c(true, 300, 9), c(true, 200, 0)]),
            Some(1)
        );
        // Capacity first, load second: a busier replica with more room still wins.
        assert_eq!(choose(&[c(true, -16, 0), c(true, 0, 50)]), Some(1));
    }

    #[test]
    fn groups_that_are_not_ready_are_skipped() {
        assert_eq!(choose(&[c(false, 1000, 0), c(true, 10, 5)]), Some(1));
        assert_eq!(choose(&[c(true, 10, 5), c(false, 1000, 0)]), Some(0));
        assert_eq!(choose(&[c(false, 1000, 0), c(false, 10, 0)]), None);
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn ties_go_to_fewest_requests_then_lowest_index() {
        assert_eq!(
            choose(&[c(true, 64, 3), c(true, 64, 1), c(true, 64, 2)]),
            Some(1)
        );
        assert_eq!(choose(&[c(true, 64, 1), c(true, 64, 1)]), Some(0));
        assert_eq!(
            choose(&[c(false, 64, 0), c(true, 64, 1), c(true, 64, 1)]),
            Some(1)
        );
    }

    struct Fake {
        health: HealthReporter,
        load: watch::Sender<Load>,
        entries: mpsc::UnboundedReceiver<Entry>,
    }

    /// Replicas with `free` blocks of 16 tokens each, every one ready.
    fn replicas(free: &[u64]) -> (Replicas, Vec<Fake>) {
        let mut list = Vec::new();
        let mut fakes = Vec::new();
        for (index, &free_blocks) in free.iter().enumerate() {
            let (health, state) = health_channel();
            health.set(Health::Ready);
            let (load, load_rx) = watch::channel(Load {
                free_blocks,
                ..Load::default()
            });
            let (tx, entries) = mpsc::unbounded_channel();
            list.push(Replica::new(index, tx, state, load_rx, 16));
            fakes.push(Fake {
                health,
                load,
                entries,
            });
        }
        (Replicas::new(list), fakes)
    }

    #[test]
    fn dispatch_spreads_a_burst_and_skips_down_replicas() {
        let (replicas, mut fakes) = replicas(&[8, 8]);
        // 16 + 16 positions: 2 blocks. Equal → replica 0; then replica 0 has
        // 2 blocks in transit, so the next goes to replica 1, and so on.
        let chosen: Vec<usize> = (0..4)
            .map(|_| replicas.dispatch(entry(16, 16)).unwrap())
            .collect();
        assert_eq!(chosen, vec![0, 1, 0, 1]);
        assert!(fakes[0].entries.try_recv().is_ok());
        assert!(fakes[1].entries.try_recv().is_ok());
        // Replica 1's task frees more room: it gets the next one.
        fakes[1].load.send_replace(Load {
            free_blocks: 100,
            received: 2,
            received_blocks: 4,
            ..Load::default()
        });
        assert_eq!(replicas.dispatch(entry(16, 16)).unwrap(), 1);
        // Down: skipped, however much room it has.
        fakes[1].health.set(Health::Down("rank 0 died".into()));
        assert!(replicas.is_ready());
        assert_eq!(replicas.reason(), "");
        assert_eq!(replicas.dispatch(entry(16, 16)).unwrap(), 0);
        fakes[0].health.set(Health::Down("decode failed".into()));
        assert!(!replicas.is_ready());
        match replicas.dispatch(entry(16, 16)) {
            Err(InferError::Unavailable(reason)) => assert_eq!(
                reason,
                "no replica is ready (replica 0: decode failed; replica 1: rank 0 died)"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_replica_keeps_its_own_reason() {
        let (replicas, fakes) = replicas(&[8]);
        fakes[0].health.set(Health::Starting);
        match replicas.dispatch(entry(1, 1)) {
            Err(InferError::Unavailable(reason)) => assert_eq!(reason, "the shards are starting"),
            other => panic!("{other:?}"),
        }
        let none = Replicas::new(Vec::new());
        assert!(!none.is_ready());
        assert!(matches!(
            none.dispatch(entry(1, 1)),
            Err(InferError::Unavailable(_))
        ));
    }
}

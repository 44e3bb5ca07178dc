//! Collectives between the ranks of one shard group, on libtorch's c10d (the C++ shim
//! in `csrc/collectives.cpp`): a `TCPStore` rendezvous hosted by rank 0, then
//! `ProcessGroupGloo` on the CPU or `ProcessGroupNCCL` on CUDA (the `cuda` feature).
//!
//! [`Communicator`] is what the model calls. With one rank it does nothing at all and
//! never touches c10d; with several, every call blocks until all ranks have made the
//! same call, or fails with a [`CollectiveError`] after the group's timeout.

use std::ffi::{c_char, c_int, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::Tensor;

/// Opaque c10d state (store and process group) owned by the shim.
#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

/// An `at::Tensor*`, as tch hands it over (`Tensor::as_mut_ptr`).
type TensorPtr = *mut std::ffi::c_void;

extern "C" {
    fn tessera_group_new(
        host: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        nccl: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawGroup;
    fn tessera_group_free(group: *mut RawGroup);
    fn tessera_all_reduce_sum(
        group: *mut RawGroup,
        tensor: TensorPtr,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_all_gather(
        group: *mut RawGroup,
        input: TensorPtr,
        dim: i64,
        output: *mut TensorPtr,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_broadcast(
        group: *mut RawGroup,
        tensor: TensorPtr,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_barrier(group: *mut RawGroup, err: *mut c_char, err_len: usize) -> c_int;
}

/// A collective or the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank} of {world}: joining the group at {address} failed: {message}")]
    Join {
        rank: usize,
        world: usize,
        address: String,
        message: String,
    },
    /// `number` counts this rank's collectives since it joined (this one included):
    /// ranks that time out at different numbers disagree on the sequence of
    /// collectives, ranks at the same number are stuck in the same exchange.
    #[error("rank {rank} of {world}: {op} (collective {number} since joining) failed: {message}")]
    Op {
        rank: usize,
        world: usize,
        op: &'static str,
        number: u64,
        message: String,
    },
    #[error("invalid group: {0}")]
    Invalid(String),
}

/// Where and how the ranks of a group meet.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Host of rank 0's rendezvous store (like torch's `MASTER_ADDR`).
    pub master_addr: String,
    /// Its port (like `MASTER_PORT`).
    pub master_port: u16,
    /// Limit on joining and on every collective.
    pub timeout: Duration,
    /// NCCL (CUDA tensors) instead of Gloo (CPU tensors).
    pub nccl: bool,
}

/// A joined c10d process group.
struct Group {
    raw: *mut RawGroup,
}

// SAFETY: the c10d store and process group may be used from any thread; the engine
// uses the group from one thread at a time (it is owned by the engine thread).
unsafe impl Send for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `tessera_group_new` and is freed exactly once.
        unsafe { tessera_group_free(self.raw) }
    }
}

const ERR_LEN: usize = 1024;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if text.is_empty() {
        "no details".into()
    } else {
        text
    }
}

/// The ranks' collectives; a no-op with one rank.
pub struct Communicator {
    rank: usize,
    world: usize,
    group: Option<Group>,
    /// Nanoseconds spent in collectives, and their number (for the benchmarks).
    spent_ns: AtomicU64,
    calls: AtomicU64,
}

/// Time spent in collectives so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CollectiveTime {
    pub seconds: f64,
    pub calls: u64,
}

impl Communicator {
    /// A single rank: nothing is ever exchanged.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            group: None,
            spent_ns: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// Total time in collectives since this rank joined.
    pub fn time_spent(&self) -> CollectiveTime {
        CollectiveTime {
            seconds: self.spent_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            calls: self.calls.load(Ordering::Relaxed),
        }
    }

    fn record(&self, started: Instant) {
        let ns = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.spent_ns.fetch_add(ns, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Joins the group (rank 0 hosts the store); blocks until every rank has joined.
    pub fn join(config: &GroupConfig) -> Result<Self, CollectiveError> {
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(CollectiveError::Invalid(format!(
                "rank {} is not within a world of {}",
                config.rank, config.world_size
            )));
        }
        if config.world_size == 1 {
            return Ok(Self::single());
        }
        let address = format!("{}:{}", config.master_addr, config.master_port);
        let join_error = |message: String| CollectiveError::Join {
            rank: config.rank,
            world: config.world_size,
            address: address.clone(),
            message,
        };
        let host = CString::new(config.master_addr.as_str())
            .map_err(|_| join_error("the master address contains a NUL byte".into()))?;
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `host` is a valid C string and `err` a writable buffer of ERR_LEN bytes,
        // both alive for the call.
        let raw = unsafe {
            tessera_group_new(
                host.as_ptr(),
                config.master_port,
                config.rank as c_int,
                config.world_size as c_int,
                config.timeout.as_millis().min(i64::MAX as u128) as i64,
                c_int::from(config.nccl),
                err.as_mut_ptr() as *mut c_char,
                ERR_LEN,
            )
        };
        if raw.is_null() {
            return Err(join_error(message(&err)));
        }
        Ok(Self {
            rank: config.rank,
            world: config.world_size,
            group: Some(Group { raw }),
            spent_ns: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    fn op_error(&self, op: &'static str, err: &[u8]) -> CollectiveError {
        CollectiveError::Op {
            rank: self.rank,
            world: self.world,
            op,
            number: self.calls.load(Ordering::Relaxed),
            message: message(err),
        }
    }

    /// Runs one shim call, timing it and turning a failure into an error naming `op`.
    /// `call` gets the error buffer and its length.
    fn exchange(
        &self,
        op: &'static str,
        call: impl FnOnce(*mut c_char, usize) -> c_int,
    ) -> Result<(), CollectiveError> {
        let mut err = [0u8; ERR_LEN];
        let started = Instant::now();
        let status = call(err.as_mut_ptr() as *mut c_char, ERR_LEN);
        self.record(started);
        if status != 0 {
            return Err(self.op_error(op, &err));
        }
        Ok(())
    }

    /// Sums `tensor` over all ranks, in place (contiguous tensors only).
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let tensor = tensor.as_mut_ptr().cast();
        // SAFETY: the group and the tensor are alive; the shim reports failures in `err`.
        self.exchange("all-reduce", |err, len| unsafe {
            tessera_all_reduce_sum(group.raw, tensor, err, len)
        })
    }

    /// Every rank's `tensor` (the same shape on all ranks), concatenated along `dim`
    /// in rank order.
    pub fn all_gather(&self, tensor: &Tensor, dim: i64) -> Result<Tensor, CollectiveError> {
        let Some(group) = &self.group else {
            return Ok(tensor.shallow_clone());
        };
        let mut input = tensor.shallow_clone();
        let input = input.as_mut_ptr().cast();
        let mut output: TensorPtr = std::ptr::null_mut();
        // SAFETY: as above; on success the shim stores a new heap tensor in `output`,
        // whose ownership passes to the `Tensor` built below.
        self.exchange("all-gather", |err, len| unsafe {
            tessera_all_gather(group.raw, input, dim, &mut output, err, len)
        })?;
        if output.is_null() {
            return Err(self.op_error("all-gather", b"the shim returned no tensor"));
        }
        // SAFETY: `output` is a tensor the shim allocated for us (see above).
        Ok(unsafe { Tensor::from_ptr(output.cast()) })
    }

    /// Makes every rank's `tensor` equal to rank `root`'s, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let tensor = tensor.as_mut_ptr().cast();
        // SAFETY: as in `all_reduce_sum`.
        self.exchange("broadcast", |err, len| unsafe {
            tessera_broadcast(group.raw, tensor, root as c_int, err, len)
        })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), CollectiveError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        // SAFETY: the group is alive; failures are reported in `err`.
        self.exchange("barrier", |err, len| unsafe {
            tessera_barrier(group.raw, err, len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn one_rank_exchanges_nothing() {
        let comm = Communicator::join(&GroupConfig {
            rank: 0,
            world_size: 1,
            master_addr: "invalid.invalid".into(),
            master_port: 1,
            timeout: Duration::from_millis(10),
            nccl: false,
        })
        .unwrap();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        comm.all_reduce_sum(&mut t).unwrap();
        comm.broadcast(&mut t, 0).unwrap();
        comm.barrier().unwrap();
        let g = comm.all_gather(&t, 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn bad_ranks_are_refused() {
        let config = GroupConfig {
            rank: 2,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            timeout: Duration::from_millis(10),
            nccl: false,
        };
        assert!(matches!(
            Communicator::join(&config),
            Err(CollectiveError::Invalid(_))
        ));
    }

    /// Three ranks as threads of this process, each with its own group.
    #[test]
    fn three_ranks_reduce_gather_broadcast_and_meet() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let comm = Communicator::join(&GroupConfig {
                        rank,
                        world_size: 3,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: Duration::from_secs(30),
                        nccl: false,
                    })
                    .unwrap();
                    let mut t = Tensor::full([2], (rank + 1) as f64, (Kind::Float, Device::Cpu));
                    comm.all_reduce_sum(&mut t).unwrap();
                    let sum = Vec::<f32>::try_from(&t).unwrap();
                    let bf = Tensor::full([2], (rank + 1) as f64, (Kind::BFloat16, Device::Cpu));
                    let mut bf = bf;
                    comm.all_reduce_sum(&mut bf).unwrap();
                    let bf_sum = Vec::<f32>::try_from(&bf.to_kind(Kind::Float)).unwrap();
                    let mine = Tensor::full([1, 2], rank as f64, (Kind::Float, Device::Cpu));
                    let gathered = comm.all_gather(&mine, 1).unwrap();
                    let gathered = Vec::<f32>::try_from(&gathered.flatten(0, -1)).unwrap();
                    let mut b = Tensor::full([3], rank as f64 * 10.0, (Kind::Float, Device::Cpu));
                    comm.broadcast(&mut b, 2).unwrap();
                    let b = Vec::<f32>::try_from(&b).unwrap();
                    comm.barrier().unwrap();
                    (sum, bf_sum, gathered, b)
                })
            })
            .collect();
        for h in handles {
            let (sum, bf_sum, gathered, b) = h.join().unwrap();
            assert_eq!(sum, vec![6.0, 6.0]);
            assert_eq!(bf_sum, vec![6.0, 6.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(b, vec![20.0, 20.0, 20.0]);
        }
    }

    #[test]
    fn a_collective_that_a_peer_never_joins_fails_with_its_number() {
        let port = free_port();
        let config = move |rank| GroupConfig {
            rank,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(3),
            nccl: false,
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let comm = Communicator::join(&config(1)).unwrap();
            let mut t = Tensor::from_slice(&[1.0f32]);
            comm.all_reduce_sum(&mut t).unwrap();
            // Stays in the group, exchanging nothing more, until rank 0 has failed.
            let _ = done_rx.recv_timeout(Duration::from_secs(60));
        });
        let comm = Communicator::join(&config(0)).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32]);
        comm.all_reduce_sum(&mut t).unwrap();
        let err = comm.all_reduce_sum(&mut t).unwrap_err();
        let _ = done_tx.send(());
        peer.join().unwrap();
        assert!(
            matches!(
                err,
                CollectiveError::Op {
                    rank: 0,
                    op: "all-reduce",
                    number: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("collective 2 since joining"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_rank_times_out_with_an_error() {
        let port = free_port();
        let started = std::time::Instant::now();
        let result = Communicator::join(&GroupConfig {
            rank: 0,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(2),
            nccl: false,
        });
        let err = result
            .err()
            .expect("joining without the other rank must fail");
        assert!(matches!(err, CollectiveError::Join { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(29_511)
    }
}

//! Runs Rust closures on libtorch's intra-op thread pool (the C++ shim in
//! `csrc/parallel.cpp` over `at::parallel_for`).
//!
//! Kernels written in Rust (see `cpu_attention`) run between libtorch operators. A
//! thread of our own would compete for the cores with libtorch's OpenMP workers, which
//! spin for a while after each operator; handing the work to those same workers keeps
//! one thread per core.

use std::ffi::c_void;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

type RangeFn = extern "C" fn(*mut c_void, i64, i64);

extern "C" {
    fn tessera_parallel_for(n: i64, grain: i64, f: RangeFn, context: *mut c_void) -> c_int;
}

/// Why a parallel loop did not complete.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParallelError {
    #[error("a parallel task panicked")]
    Panicked,
    #[error("libtorch's parallel_for failed")]
    Torch,
}

struct State<'a> {
    body: &'a (dyn Fn(usize) + Sync),
    panicked: AtomicBool,
}

extern "C" fn run_range(context: *mut c_void, begin: i64, end: i64) {
    // SAFETY: `context` is the `State` that `for_each` passed in, alive until
    // `tessera_parallel_for` returns.
    let state = unsafe { &*(context as *const State) };
    for i in begin.max(0)..end.max(0) {
        // A panic must not unwind into C++: it is recorded and reported instead.
        if catch_unwind(AssertUnwindSafe(|| (state.body)(i as usize))).is_err() {
            state.panicked.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// Calls `body(i)` for every `i` in `0..n`, spread over libtorch's threads (each call
/// on one thread; calls on different threads run concurrently).
pub fn for_each(n: usize, body: &(dyn Fn(usize) + Sync)) -> Result<(), ParallelError> {
    if n <= 1 {
        for i in 0..n {
            catch_unwind(AssertUnwindSafe(|| body(i))).map_err(|_| ParallelError::Panicked)?;
        }
        return Ok(());
    }
    let state = State {
        body,
        panicked: AtomicBool::new(false),
    };
    // SAFETY: `run_range` only reads `state`, which outlives the call.
    let status = unsafe {
        tessera_parallel_for(
            n as i64,
            1,
            run_range,
            &state as *const State as *mut c_void,
        )
    };
    if status != 0 {
        return Err(ParallelError::Torch);
    }
    if state.panicked.load(Ordering::Relaxed) {
        return Err(ParallelError::Panicked);
    }
    Ok(())
}

/// Calls `body(span)` for consecutive spans of at most `per_task` of `0..n`, on
/// libtorch's threads when there is more than one span (inline otherwise, sparing the
/// fork for small inputs).
pub fn for_each_span(
    n: usize,
    per_task: usize,
    body: &(dyn Fn(std::ops::Range<usize>) + Sync),
) -> Result<(), ParallelError> {
    let per_task = per_task.max(1);
    let span = |t: usize| t * per_task..((t + 1) * per_task).min(n);
    let tasks = n.div_ceil(per_task);
    if tasks <= 1 {
        (0..tasks).for_each(|t| body(span(t)));
        return Ok(());
    }
    for_each(tasks, &|t| body(span(t)))
}

/// Splits items of the given costs into `bins` groups of nearly equal total cost
/// (longest first, each to the least loaded group). Returns the item indices per group.
pub fn balance(costs: &[usize], bins: usize) -> Vec<Vec<usize>> {
    let bins = bins.clamp(1, costs.len().max(1));
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(costs[i]));
    let mut groups = vec![Vec::new(); bins];
    let mut loads = vec![0usize; bins];
    for i in order {
        let (g, _) = loads
            .iter()
            .enumerate()
            .min_by_key(|&(_, &l)| l)
            .unwrap_or((0, &0));
        groups[g].push(i);
        loads[g] += costs[i];
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_index_runs_exactly_once() {
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        for_each(hits.len(), &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panic_is_an_error_not_an_abort() {
        let result = for_each(4, &|i| {
            if i == 2 {
                panic!("boom");
            }
        });
        assert_eq!(result, Err(ParallelError::Panicked));
    }

    #[test]
    fn spans_cover_the_range_once() {
        for (n, per_task) in [(0, 4), (3, 4), (4, 4), (10, 4), (100, 16), (5, 0)] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each_span(n, per_task, &|span| {
                assert!(span.len() <= per_task.max(1));
                for i in span {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            })
            .unwrap();
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{n} {per_task}"
            );
        }
    }

    #[test]
    fn balance_spreads_the_cost() {
        let groups = balance(&[10, 1, 1, 9, 5, 5], 2);
        let load = |g: &Vec<usize>| g.iter().map(|&i| [10, 1, 1, 9, 5, 5][i]).sum::<usize>();
        assert_eq!(groups.len(), 2);
        assert_eq!(load(&groups[0]) + load(&groups[1]), 31);
        assert!(load(&groups[0]).abs_diff(load(&groups[1])) <= 1);
        assert_eq!(balance(&[], 4).len(), 1);
        assert_eq!(balance(&[3], 4), vec![vec![0]]);
    }
}

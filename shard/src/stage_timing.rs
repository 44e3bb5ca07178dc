//! Where a decode step's time goes, for `tessera-shard bench` with
//! `TESSERA_STAGE_TIMING=1`: the engine marks the end of each stage (embedding, the
//! layers' norm, projections, rotary, KV write, attention, MLP, head, logits copy,
//! sampling, detokenizing) and the time since the previous mark is added to that stage.
//! On CUDA each mark first waits for the GPU, so a stage's time is its kernels' time
//! plus the host's time to launch them; the waits also stop the host from running
//! ahead of the GPU, so the step takes longer than without timing. Off (the default),
//! a mark costs one relaxed atomic load.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tch::Device;

static FROM_ENV: OnceLock<bool> = OnceLock::new();
static FORCED: AtomicBool = AtomicBool::new(false);

struct Clock {
    device: Device,
    last: Option<Instant>,
    /// Seconds per stage, in the order the stages were first seen.
    totals: Vec<(&'static str, f64)>,
}

thread_local! {
    static CLOCK: RefCell<Clock> = const {
        RefCell::new(Clock {
            device: Device::Cpu,
            last: None,
            totals: Vec::new(),
        })
    };
}

/// Whether stages are timed: `TESSERA_STAGE_TIMING=1` (read once), or [`force`].
pub fn enabled() -> bool {
    FORCED.load(Ordering::Relaxed)
        || *FROM_ENV.get_or_init(|| {
            std::env::var("TESSERA_STAGE_TIMING").is_ok_and(|v| v == "1" || v == "true")
        })
}

/// Turns timing on for this process regardless of the environment.
#[cfg(test)]
fn force() {
    FORCED.store(true, Ordering::Relaxed);
}

fn wait_for(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Starts timing a step on `device` (this thread).
pub fn start(device: Device) {
    if !enabled() {
        return;
    }
    wait_for(device);
    CLOCK.with_borrow_mut(|c| {
        c.device = device;
        c.last = Some(Instant::now());
    });
}

/// Ends `stage`: the time since the previous mark (or [`start`]) is added to it.
pub fn mark(stage: &'static str) {
    if !enabled() {
        return;
    }
    CLOCK.with_borrow_mut(|c| {
        let Some(last) = c.last else {
            return;
        };
        wait_for(c.device);
        let now = Instant::now();
        let seconds = now.duration_since(last).as_secs_f64();
        match c.totals.iter_mut().find(|(name, _)| *name == stage) {
            Some((_, total)) => *total += seconds,
            None => c.totals.push((stage, seconds)),
        }
        c.last = Some(now);
    });
}

/// Ends the step: marks count again only after the next [`start`].
pub fn finish() {
    if !enabled() {
        return;
    }
    CLOCK.with_borrow_mut(|c| c.last = None);
}

/// The seconds per stage since the last call (this thread), and resets them.
pub fn take() -> Vec<(&'static str, f64)> {
    CLOCK.with_borrow_mut(|c| {
        c.last = None;
        std::mem::take(&mut c.totals)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_in_first_seen_order() {
        force();
        take();
        start(Device::Cpu);
        std::thread::sleep(std::time::Duration::from_millis(2));
        mark("a");
        mark("b");
        std::thread::sleep(std::time::Duration::from_millis(2));
        mark("a");
        let stages = take();
        let names: Vec<&str> = stages.iter().map(|s| s.0).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(stages[0].1 >= 0.004, "{stages:?}");
        assert!(stages[1].1 < stages[0].1, "{stages:?}");
        assert!(take().is_empty(), "take resets");
        mark("c");
        assert!(take().is_empty(), "no mark counts before start");
        start(Device::Cpu);
        finish();
        mark("d");
        assert!(take().is_empty(), "no mark counts after finish");
    }
}

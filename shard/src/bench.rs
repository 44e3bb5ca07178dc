//! `tessera-shard bench`: load time, prefill and decode throughput and peak RSS of
//! the engine itself, one process per dtype so that each peak RSS is its own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli::{engine_config, model_path, ModelArgs};
use crate::collectives::GroupConfig;
use crate::kv_cache::BlockAllocator;
use crate::sampling::SamplingParams;
use crate::stopping::StoppingCriteria;
use crate::{Engine, GenerateRequest};

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dtypes to measure, each in its own process.
    #[arg(long, value_delimiter = ',', default_value = "float32,bfloat16")]
    pub dtypes: Vec<String>,
    /// Prompt lengths for the prefill measurement (one prompt per forward pass).
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub prefill_lens: Vec<usize>,
    /// Batch sizes for the decode measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch_sizes: Vec<usize>,
    /// Prompt length of each sequence before decoding starts.
    #[arg(long, default_value_t = 128)]
    pub decode_context: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Timed repetitions of each prefill.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Prompt length of the mixed-step measurement: at each batch size, a prefill of
    /// this many tokens and one decode step of the batch, run apart and then as one
    /// forward pass (what `--decode-in-prefill` does); 0 skips it.
    #[arg(long, default_value_t = 256)]
    pub mixed_prompt: usize,
    /// Prompt length of the chunked-prefill measurement: at each batch size, this
    /// prompt joins the running batch whole (one forward pass with the batch's decode
    /// step) and then in chunks of `--chunk-size` tokens (one per decode step), as a
    /// router does with chunked prefill; prints the longest step (the running
    /// streams' longest wait between two tokens) and the total. 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub chunk_prompt: usize,
    /// Chunk size of the chunked-prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Tensor-parallel ranks (processes) to split the model over; the figures also
    /// give the time spent in collectives per decode step.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Internal: measure `--dtype` in this process and print one JSON line.
    #[arg(long, hide = true)]
    pub single: bool,
    /// Internal: this process's rank with `--single`.
    #[arg(long, hide = true, default_value_t = 0)]
    pub rank: usize,
    /// Internal: the rendezvous port with `--single`.
    #[arg(long, hide = true, default_value_t = 0)]
    pub master_port: u16,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Figures {
    pub model: String,
    pub dtype: String,
    pub device: String,
    pub threads: i32,
    pub load_seconds: f64,
    /// (prompt length, tokens/s), median over the repeats.
    pub prefill_tokens_per_second: Vec<(usize, f64)>,
    /// (batch size, tokens/s over all sequences), from the median step time.
    pub decode_tokens_per_second: Vec<(usize, f64)>,
    pub peak_rss_mib: f64,
    /// Ranks the model was split over.
    #[serde(default)]
    pub world_size: usize,
    /// (batch size, seconds in collectives per decode step, share of the step), medians.
    #[serde(default)]
    pub decode_collectives: Vec<(usize, f64, f64)>,
    /// With `TESSERA_STAGE_TIMING=1`: (batch size, [(stage, seconds per decode step)]),
    /// means over the timed steps (see `stage_timing`).
    #[serde(default)]
    pub decode_stages: Vec<(usize, Vec<(String, f64)>)>,
    /// With `TESSERA_STAGE_TIMING=1`: (prompt length, [(stage, seconds per prefill)]),
    /// means over the timed repeats.
    #[serde(default)]
    pub prefill_stages: Vec<(usize, Vec<(String, f64)>)>,
    /// (batch size, prompt length, seconds for a prefill and a decode step apart,
    /// seconds for both in one forward pass), medians.
    #[serde(default)]
    pub mixed_steps: Vec<(usize, usize, f64, f64)>,
    /// (batch size, prompt length, chunk size, [whole, chunked]), medians.
    #[serde(default)]
    pub chunked_prefill: Vec<(usize, usize, usize, [ChunkedTimes; 2])>,
}

/// A prompt joining a running batch: seconds of the longest step and of all steps
/// until the prompt has its first token (the batch takes a decode step in each).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default)]
pub struct ChunkedTimes {
    pub longest_step: f64,
    pub total: f64,
    pub steps: usize,
}

/// Largest number of prompt tokens prefilled in one forward pass by the decode benchmark.
const PREFILL_TOKENS: usize = 2048;

const MARK: &str = "TESSERA_BENCH_JSON ";

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.single {
        let figures = measure(&args)?;
        println!("{MARK}{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the tessera-shard binary")?;
    let world = args.world_size.max(1);
    // Ranks on one machine share its cores (see `tessera serve`).
    let threads = if args.model.threads == 0 && world > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / world).max(1) as i32
    } else {
        args.model.threads
    };
    let mut all = Vec::new();
    for dtype in &args.dtypes {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("finding a free rendezvous port")?;
        let mut children = Vec::with_capacity(world);
        for rank in 0..world {
            let mut cmd = Command::new(&exe);
            cmd.arg("bench")
                .arg("--single")
                .args(["--dtype", dtype, "--device", &args.model.device])
                .args(["--threads", &threads.to_string()])
                .args(["--kv-tokens", &args.model.kv_tokens.to_string()])
                .args(["--block-size", &args.model.block_size.to_string()])
                .args(["--prefill-lens", &join(&args.prefill_lens)])
                .args(["--batch-sizes", &join(&args.batch_sizes)])
                .args(["--decode-context", &args.decode_context.to_string()])
                .args(["--decode-steps", &args.decode_steps.to_string()])
                .args(["--repeats", &args.repeats.to_string()])
                .args(["--mixed-prompt", &args.mixed_prompt.to_string()])
                .args(["--chunk-prompt", &args.chunk_prompt.to_string()])
                .args(["--chunk-size", &args.chunk_size.to_string()])
                .args([
                    "--world-size",
                    &world.to_string(),
                    "--rank",
                    &rank.to_string(),
                ])
                .args(["--master-port", &port.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(m) = &args.model.model {
                cmd.arg("--model").arg(m);
            }
            children.push(cmd.spawn().context("running the bench child process")?);
        }
        eprintln!("bench: measuring {dtype} on {world} rank(s) ...");
        let mut outputs = Vec::with_capacity(world);
        for child in children {
            outputs.push(
                child
                    .wait_with_output()
                    .context("waiting for a bench child")?,
            );
        }
        if let Some(failed) = outputs.iter().find(|o| !o.status.success()) {
            bail!(
                "bench for {dtype} failed: {}",
                String::from_utf8_lossy(&failed.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&outputs[0].stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(MARK))
            .context("bench child printed no figures")?;
        let figures: Figures = serde_json::from_str(line)?;
        print_figures(&figures);
        all.push(figures);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}

fn join(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

fn print_figures(f: &Figures) {
    println!(
        "model {} | {} on {} | {} threads | {} rank(s)",
        f.model,
        f.dtype,
        f.device,
        f.threads,
        f.world_size.max(1)
    );
    println!("  load time            {:>9.2} s", f.load_seconds);
    for (len, tps) in &f.prefill_tokens_per_second {
        println!("  prefill {len:>5} tokens {tps:>9.1} tokens/s");
    }
    for (b, tps) in &f.decode_tokens_per_second {
        println!("  decode batch {b:>3}     {tps:>9.1} tokens/s");
    }
    for (b, seconds, share) in &f.decode_collectives {
        println!(
            "  collectives, batch {b:>3} {:>7.2} ms per decode step ({:.0}% of it)",
            seconds * 1e3,
            share * 100.0
        );
    }
    for (len, stage_times) in &f.prefill_stages {
        print_stages(&format!("prefill {len:>5} tokens"), "prompt", stage_times);
    }
    for (b, stage_times) in &f.decode_stages {
        print_stages(&format!("decode batch {b:>3}"), "step", stage_times);
    }
    for (b, len, apart, together) in &f.mixed_steps {
        println!(
            "  prefill {len} tokens + decode batch {b:>3}: {:.1} ms apart, {:.1} ms in one pass ({:.2}x)",
            apart * 1e3,
            together * 1e3,
            apart / together.max(1e-12)
        );
    }
    for (b, len, chunk, [whole, chunked]) in &f.chunked_prefill {
        println!(
            "  prompt of {len} tokens joining batch {b:>3}: whole, longest step {:.1} ms, \
             {:.1} ms in {} step(s); in chunks of {chunk}, longest step {:.1} ms, {:.1} ms in {} steps",
            whole.longest_step * 1e3,
            whole.total * 1e3,
            whole.steps,
            chunked.longest_step * 1e3,
            chunked.total * 1e3,
            chunked.steps
        );
    }
    println!("  peak RSS             {:>9.1} MiB", f.peak_rss_mib);
}

/// One stage breakdown: its total per `unit`, then each stage's time and share.
fn print_stages(what: &str, unit: &str, stage_times: &[(String, f64)]) {
    let total: f64 = stage_times.iter().map(|s| s.1).sum();
    println!(
        "  {what} by stage (timed, {:.2} ms per {unit}):",
        total * 1e3
    );
    for (name, seconds) in stage_times {
        println!(
            "    {name:<16} {:>8.3} ms {:>5.1}%",
            seconds * 1e3,
            100.0 * seconds / total.max(1e-12)
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Deterministic, varied prompt tokens away from the special ids at the start of the vocabulary.
fn prompt(seed: usize, len: usize, vocab: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(200).max(1);
    (0..len)
        .map(|i| (200 + (seed * 7919 + i * 104_729) % span) as u32)
        .collect()
}

fn request(
    engine: &Engine,
    blocks: &mut BlockAllocator,
    id: u64,
    prompt: Vec<u32>,
    new_tokens: u32,
) -> anyhow::Result<GenerateRequest> {
    let block_table = blocks.allocate(prompt.len() + new_tokens as usize)?;
    Ok(GenerateRequest {
        id,
        prompt,
        sampling: SamplingParams::default(),
        stopping: StoppingCriteria {
            max_new_tokens: new_tokens,
            eos_token_ids: engine.eos_ids().to_vec(),
            stop_sequences: Vec::new(),
            ignore_eos: true,
            min_new_tokens: 0,
        },
        block_table,
        cached_tokens: 0,
        prompt_logprobs: false,
        prefill_only: false,
    })
}

fn measure(args: &BenchArgs) -> anyhow::Result<Figures> {
    let _guard = tch::no_grad_guard();
    let mut config = engine_config(&args.model)?;
    if args.world_size > 1 {
        config.group = Some(GroupConfig {
            rank: args.rank,
            world_size: args.world_size,
            master_addr: "127.0.0.1".into(),
            master_port: args.master_port,
            timeout: std::time::Duration::from_secs(300),
            nccl: config.device.is_cuda(),
        });
    }
    let path = model_path(&args.model);
    let start = Instant::now();
    let mut engine = Engine::load(&path, &config)?;
    let load_seconds = start.elapsed().as_secs_f64();
    let vocab = engine.model_config().vocab_size;
    let cache = engine.cache();
    let mut blocks = BlockAllocator::new(cache.num_blocks(), cache.block_size());

    let mut prefill = Vec::new();
    let mut prefill_stages = Vec::new();
    for &len in &args.prefill_lens {
        let mut times = Vec::new();
        for rep in 0..=args.repeats {
            let r = request(&engine, &mut blocks, 0, prompt(rep, len, vocab), 1)?;
            let t = Instant::now();
            crate::stage_timing::start(engine.device());
            let (mut batch, _) = engine.prefill(vec![r])?;
            crate::stage_timing::finish();
            let elapsed = t.elapsed().as_secs_f64();
            if rep == 0 {
                crate::stage_timing::take();
            } else {
                times.push(elapsed);
            }
            for (_, table) in batch.filter(&[]) {
                blocks.release(table);
            }
        }
        prefill.push((len, len as f64 / median(times)));
        let per_prompt = 1.0 / args.repeats.max(1) as f64;
        let stage_times: Vec<(String, f64)> = crate::stage_timing::take()
            .into_iter()
            .map(|(name, seconds)| (name.to_string(), seconds * per_prompt))
            .collect();
        if !stage_times.is_empty() {
            prefill_stages.push((len, stage_times));
        }
    }

    let mut decode = Vec::new();
    let mut collectives = Vec::new();
    let mut stages = Vec::new();
    let mut mixed_steps = Vec::new();
    let mut chunked_prefill = Vec::new();
    let warmup = 2;
    for &b in &args.batch_sizes {
        let chunk_steps = if args.chunk_prompt > 0 {
            2 * CHUNKED_REPEATS * args.chunk_prompt.div_ceil(args.chunk_size.max(1))
        } else {
            0
        };
        let steps = (args.decode_steps + warmup + 1 + 2 * MIXED_REPEATS + chunk_steps) as u32;
        // Prompts are prefilled in groups of at most PREFILL_TOKENS tokens, as a router
        // with a prefill budget would, and merged into one running batch.
        let mut batch = crate::Batch::default();
        let per_group = (PREFILL_TOKENS / args.decode_context.max(1)).max(1);
        for first in (0..b).step_by(per_group) {
            let requests = (first..b.min(first + per_group))
                .map(|i| {
                    let p = prompt(i + 100, args.decode_context, vocab);
                    request(&engine, &mut blocks, i as u64, p, steps)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (group, _) = engine.prefill(requests)?;
            batch.merge(group);
        }
        let mut times = Vec::new();
        let mut exchange = Vec::new();
        for step in 0..warmup + args.decode_steps {
            if step == warmup {
                crate::stage_timing::take();
            }
            let before = engine.collective_time().seconds;
            let t = Instant::now();
            let generations = engine.decode(&mut batch)?;
            let elapsed = t.elapsed().as_secs_f64();
            let in_collectives = engine.collective_time().seconds - before;
            if generations.len() != b {
                bail!(
                    "decode step {step} advanced {} of {b} sequences",
                    generations.len()
                );
            }
            if step >= warmup {
                times.push(elapsed);
                exchange.push((in_collectives, in_collectives / elapsed.max(1e-12)));
            }
        }
        let step = median(times);
        decode.push((b, b as f64 / step));
        let per_step = 1.0 / args.decode_steps.max(1) as f64;
        let stage_times: Vec<(String, f64)> = crate::stage_timing::take()
            .into_iter()
            .map(|(name, seconds)| (name.to_string(), seconds * per_step))
            .collect();
        if !stage_times.is_empty() {
            stages.push((b, stage_times));
        }
        if args.world_size > 1 {
            let seconds = median(exchange.iter().map(|e| e.0).collect());
            let share = median(exchange.iter().map(|e| e.1).collect());
            collectives.push((b, seconds, share));
        }
        if args.mixed_prompt > 0 {
            let (apart, together) =
                measure_mixed(&mut engine, &mut blocks, &mut batch, args.mixed_prompt)?;
            mixed_steps.push((b, args.mixed_prompt, apart, together));
        }
        if args.chunk_prompt > 0 {
            let chunk = args.chunk_size.max(1);
            let times = measure_chunked(
                &mut engine,
                &mut blocks,
                &mut batch,
                args.chunk_prompt,
                chunk,
            )?;
            chunked_prefill.push((b, args.chunk_prompt, chunk, times));
        }
        for (_, table) in batch.filter(&[]) {
            blocks.release(table);
        }
    }
    Ok(Figures {
        model: path.display().to_string(),
        dtype: if config.small_batch_copies {
            format!(
                "{} (int4/int8 copies for small batches)",
                crate::device::kind_name(config.kind)
            )
        } else {
            crate::device::kind_name(config.kind).to_string()
        },
        device: args.model.device.clone(),
        threads: tch::get_num_threads(),
        load_seconds,
        prefill_tokens_per_second: prefill,
        decode_tokens_per_second: decode,
        peak_rss_mib: peak_rss_mib(),
        world_size: args.world_size.max(1),
        decode_collectives: collectives,
        decode_stages: stages,
        prefill_stages,
        mixed_steps,
        chunked_prefill,
    })
}

/// Rounds of the chunked-prefill measurement.
const CHUNKED_REPEATS: usize = 3;

/// A `len`-token prompt joining `batch`: whole, in one forward pass with the batch's
/// decode step, then as `chunk`-token prefill-only chunks, one per decode step of the
/// batch, and its last piece; alternated, medians of each figure.
fn measure_chunked(
    engine: &mut Engine,
    blocks: &mut BlockAllocator,
    batch: &mut crate::Batch,
    len: usize,
    chunk: usize,
) -> anyhow::Result<[ChunkedTimes; 2]> {
    let vocab = engine.model_config().vocab_size;
    let mut rounds: [Vec<ChunkedTimes>; 2] = [Vec::new(), Vec::new()];
    for round in 0..CHUNKED_REPEATS {
        let id = 2_000_000 + round as u64;
        let mut first_tokens = Vec::new();
        for (chunked, times) in rounds.iter_mut().enumerate() {
            let whole = request(engine, blocks, id, prompt(id as usize, len, vocab), 1)?;
            let mut pieces = Vec::new();
            if chunked == 1 {
                let mut start = 0;
                while len - start > chunk {
                    let mut piece = whole.clone();
                    piece.prompt.truncate(start + chunk);
                    piece.cached_tokens = start;
                    piece.prefill_only = true;
                    pieces.push(piece);
                    start += chunk;
                }
                let mut last = whole;
                last.cached_tokens = start;
                pieces.push(last);
            } else {
                pieces.push(whole);
            }
            let mut t = ChunkedTimes::default();
            for piece in pieces {
                let started = Instant::now();
                let (fresh, generations, _) = engine.prefill_and_decode(vec![piece], batch)?;
                let elapsed = started.elapsed().as_secs_f64();
                t.longest_step = t.longest_step.max(elapsed);
                t.total += elapsed;
                t.steps += 1;
                first_tokens.extend(generations.iter().map(|g| g.token_id));
                for (_, table) in { fresh }.filter(&[]) {
                    blocks.release(table);
                }
            }
            times.push(t);
        }
        if first_tokens.len() != 2 {
            bail!("the prompt's first token came {} times", first_tokens.len());
        }
    }
    let pick = |v: &[ChunkedTimes]| ChunkedTimes {
        longest_step: median(v.iter().map(|t| t.longest_step).collect()),
        total: median(v.iter().map(|t| t.total).collect()),
        steps: v.first().map_or(0, |t| t.steps),
    };
    Ok([pick(&rounds[0]), pick(&rounds[1])])
}

/// Rounds of the mixed-step measurement (each takes two decode steps of the batch).
const MIXED_REPEATS: usize = 4;

/// Median seconds of a `len`-token prefill followed by a decode step of `batch`, and of
/// both in one forward pass (`Engine::prefill_and_decode`), alternated.
fn measure_mixed(
    engine: &mut Engine,
    blocks: &mut BlockAllocator,
    batch: &mut crate::Batch,
    len: usize,
) -> anyhow::Result<(f64, f64)> {
    let vocab = engine.model_config().vocab_size;
    let (mut apart, mut together) = (Vec::new(), Vec::new());
    for round in 0..MIXED_REPEATS {
        for fused in [false, true] {
            let id = 1_000_000 + (2 * round + usize::from(fused)) as u64;
            let r = request(engine, blocks, id, prompt(id as usize, len, vocab), 1)?;
            let t = Instant::now();
            let mut fresh = if fused {
                engine.prefill_and_decode(vec![r], batch)?.0
            } else {
                let (fresh, _) = engine.prefill(vec![r])?;
                engine.decode(batch)?;
                fresh
            };
            let elapsed = t.elapsed().as_secs_f64();
            if fused { &mut together } else { &mut apart }.push(elapsed);
            for (_, table) in fresh.filter(&[]) {
                blocks.release(table);
            }
        }
    }
    Ok((median(apart), median(together)))
}

/// The process's peak resident set (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

//! Parsing of the dtype and device names users pass on the command line.

use tch::{Cuda, Device, Kind};

use crate::error::{EngineError, Result};

pub fn parse_kind(name: &str) -> Result<Kind> {
    match name.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" | "float" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "f16" | "fp16" | "half" => Ok(Kind::Half),
        _ => Err(EngineError::BadDtype(name.to_string())),
    }
}

/// `parse_kind`, plus `auto`: the fastest dtype `device` computes in (see `auto_kind`).
pub fn resolve_kind(name: &str, device: Device) -> Result<Kind> {
    Ok(resolve_precision(name, device)?.kind)
}

/// The weights' dtype, and whether f32 weights keep compressed copies for small batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub kind: Kind,
    pub small_batch_copies: bool,
}

/// `resolve_kind`; `auto` resolved to f32 on a CPU also keeps the int4/int8 copies for
/// small batches, whose kernels are fast there (see `EngineConfig::small_batch_copies`).
/// An explicit `float32` stays exact.
pub fn resolve_precision(name: &str, device: Device) -> Result<Precision> {
    if name.eq_ignore_ascii_case("auto") {
        let kind = auto_kind(device);
        return Ok(Precision {
            kind,
            small_batch_copies: device == Device::Cpu && kind == Kind::Float,
        });
    }
    Ok(Precision {
        kind: parse_kind(name)?,
        small_batch_copies: false,
    })
}

/// bf16 on a GPU and on a CPU whose matmul kernels compute bf16 natively; f32 on other
/// CPUs. libtorch's bf16 kernels on a CPU with AVX2 alone convert every element on the fly
/// (its oneDNN path needs AVX-512), which measured 3x slower than f32 for a decode step of
/// 32 rows and 5.5x slower in prefill on a 2-core AMD EPYC (`tessera-shard bench`).
pub fn auto_kind(device: Device) -> Kind {
    match device {
        Device::Cpu if !cpu_computes_bf16() => Kind::Float,
        _ => Kind::BFloat16,
    }
}

/// Whether this CPU has the instructions libtorch's bf16 matmuls (oneDNN) run on: AVX-512
/// BF16 (AMX machines have it too), or the AVX-512 set oneDNN emulates bf16 with (its
/// refusal elsewhere: "bf16 path needs the cpu support avx_ne_convert or avx512bw,
/// avx512vl and avx512dq"; AVX-NE-CONVERT alone is not checked, so such CPUs get f32).
pub fn cpu_computes_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            || (std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq"))
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// `cpu`, `cuda` (device 0) or `cuda:N`; CUDA devices must exist.
pub fn parse_device(name: &str) -> Result<Device> {
    let lower = name.to_ascii_lowercase();
    let device = match lower.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => return Err(EngineError::BadDevice(name.to_string())),
        },
    };
    if let Device::Cuda(i) = device {
        let cuda_devices = Cuda::device_count();
        if i as i64 >= cuda_devices {
            return Err(EngineError::DeviceUnavailable {
                name: name.to_string(),
                cuda_devices,
            });
        }
        prefer_fused_attention_kernels();
    }
    Ok(device)
}

/// On Hopper and newer GPUs with cuDNN > 9.15, libtorch 2.11 tries cuDNN's attention first,
/// and cuDNN builds a new execution graph for every sequence length it has not seen: on an
/// H100 that cost 35-45 ms per call against 0.03-0.09 ms for the flash kernel
/// (bench/gpu/sdpa_probe.py), i.e. every decode step and every new prompt length.
/// `TORCH_CUDNN_SDPA_DEPRIORITIZED` (read once, at the first attention call) puts cuDNN
/// last again. An explicit setting in the environment is left alone.
fn prefer_fused_attention_kernels() {
    const VAR: &str = "TORCH_CUDNN_SDPA_DEPRIORITIZED";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_bf16_on_gpus_and_on_cpus_that_compute_it() {
        assert_eq!(
            resolve_kind("auto", Device::Cuda(0)).unwrap(),
            Kind::BFloat16
        );
        let cpu = if cpu_computes_bf16() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        assert_eq!(resolve_kind("AUTO", Device::Cpu).unwrap(), cpu);
        let auto = resolve_precision("auto", Device::Cpu).unwrap();
        assert_eq!(auto.small_batch_copies, cpu == Kind::Float);
        assert!(
            !resolve_precision("auto", Device::Cuda(0))
                .unwrap()
                .small_batch_copies
        );
        assert!(
            !resolve_precision("float32", Device::Cpu)
                .unwrap()
                .small_batch_copies
        );
        assert_eq!(resolve_kind("float16", Device::Cpu).unwrap(), Kind::Half);
        assert!(resolve_kind("automatic", Device::Cpu).is_err());
    }

    /// The CPUID check agrees with the flags the kernel reports in /proc/cpuinfo.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn the_bf16_check_agrees_with_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else {
            return;
        };
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let expected = has("avx512_bf16")
            || (has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq"));
        assert_eq!(cpu_computes_bf16(), expected, "{flags}");
    }

    #[test]
    fn parses_names() {
        assert_eq!(parse_kind("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_kind("int3").is_err());
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
    }

    #[test]
    fn a_missing_gpu_is_named_with_the_devices_there_are() {
        if Cuda::device_count() > 0 {
            return; // this check is about machines without that GPU
        }
        let e = parse_device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("device cuda:1 is not available"), "{e}");
        assert!(e.contains("no CUDA device is usable"), "{e}");
        let two = EngineError::DeviceUnavailable {
            name: "cuda:1".into(),
            cuda_devices: 1,
        }
        .to_string();
        assert!(two.contains("1 CUDA device(s), cuda:0 to cuda:0"), "{two}");
        assert!(two.contains("one GPU per rank"), "{two}");
    }
}

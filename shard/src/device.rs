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

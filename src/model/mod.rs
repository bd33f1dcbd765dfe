//! The DINO networks on candle: a ViT backbone ([`vit`]), the DINO projection head ([`head`]) and
//! the multi-crop wrapper that runs them ([`multicrop`]), built from a preset ([`config`]),
//! optionally starting from pretrained DINO or timm weights ([`pretrained`]).
//!
//! Parameters carry the reference DINO names (`blocks.0.attn.qkv.weight`, `mlp.0.weight`, ...), so
//! PyTorch checkpoints load as safetensors without renaming. Every op on a training path is built
//! from primitives with a backward pass ([`ops`]); candle's fused layer norm and softmax have none.

pub mod config;
pub mod head;
pub mod multicrop;
pub mod ops;
pub mod params;
pub mod pretrained;
pub mod vit;

use anyhow::Result;

/// The candle device for a configured [`crate::config::Device`]. CUDA needs a build with
/// `--features cuda`; without it this says so instead of failing later.
pub fn device(choice: crate::config::Device) -> Result<candle_core::Device> {
    match choice {
        crate::config::Device::Cpu => Ok(candle_core::Device::Cpu),
        crate::config::Device::Cuda => cuda_device(),
    }
}

/// Keep freed tensor memory in the process for the next step instead of handing it back to the
/// kernel. candle allocates a fresh buffer for every op's output; with glibc's defaults the
/// freed buffers go back to the kernel (heap trimming, or `munmap` for blocks above a threshold
/// that starts at 128 KiB) and the next step's buffers fault in zeroed pages again: a quarter of
/// the CPU time of a micro-preset training step was system time spent that way. Called once
/// by the training commands; the cost is that the process's resident memory stays at its
/// high-water mark (which every step reaches anyway). A no-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc refuses mmap thresholds above 32 MiB on 64-bit targets: larger blocks stay mmap'd.
        let settings = [
            (libc::M_MMAP_THRESHOLD, 32 << 20),
            (libc::M_TRIM_THRESHOLD, 1 << 30),
            (libc::M_TOP_PAD, 64 << 20),
        ];
        for (param, value) in settings {
            // SAFETY: mallopt only changes allocator tuning; it is called before the training
            // threads start, and a refused setting (return 0) leaves glibc's default in place.
            if unsafe { libc::mallopt(param, value) } == 0 {
                log::debug!("glibc refused mallopt({param}, {value})");
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<candle_core::Device> {
    use anyhow::Context;
    candle_core::Device::new_cuda(0).context("cannot open CUDA device 0 (is the NVIDIA driver loaded?)")
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<candle_core::Device> {
    anyhow::bail!(
        "device `cuda`: this binary was built without CUDA support; rebuild with \
         `cargo build --release --features cuda` (see README, \"Building with CUDA\") or use `--device cpu`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_is_always_available() {
        assert!(device(crate::config::Device::Cpu).unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = device(crate::config::Device::Cuda).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}

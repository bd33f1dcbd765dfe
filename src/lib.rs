//! # dinostream
//!
//! Keeps a self-supervised DINO vision model learning from Sentinel-2 tiles as they arrive.
//!
//! Data flows one way through the stages, one module each:
//!
//! ```text
//! watch -> ingest (tile) -> replay -> augment -> train (model, dino) -> checkpoint / export
//! ```
//!
//! - [`config`]: the one validated configuration tree, loaded from TOML and overridden by flags.
//! - [`fsio`]: atomic file writes; the only place that renames files.
//! - [`tile`]: ingest. A path becomes [`tile::Patch`]es: `[C, H, W]` f32 reflectance with band names
//!   and the source window. TIFF decoding sits behind a panic boundary here and nowhere else.
//! - [`stream`]: watch the incoming folder, remember every tile in the ledger, mix fresh and
//!   replayed patches into batches.
//! - [`augment`]: multi-crop views and batches (plain f32, no candle).
//! - [`model`]: the ViT backbone, DINO head and multi-crop wrapper on candle, from `models/*.toml`.
//! - [`dino`]: loss, schedules, optimiser, teacher EMA, the training step, checkpoints.
//! - [`infer`]: ONNX Runtime (loaded at run time): embeddings, k-NN and linear-probe evaluation.
//! - [`export`]: the teacher backbone as ONNX, verified in ONNX Runtime before it is published.
//! - [`service`]: the long-running `serve` loop: threads, channels, signals, systemd, status.
//! - [`cli`]: one function per subcommand; the binary's `main` only calls into it.

// In pipeline order; a module uses only modules above it.
pub mod config;
pub mod fsio;
pub mod tile;
pub mod stream;
pub mod augment;
pub mod model;
pub mod dino;
pub mod infer;
pub mod export;
pub mod service;
pub mod cli;

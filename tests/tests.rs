//! Integration tests: one binary, one module per area. They run the real `dinostream` binary on
//! temporary folders (see `util.rs`).

mod tiff_writer;
mod util;

mod augment;
mod cli;
mod layering;
mod pipeline;
mod ingest;
mod stream;
mod dino;
mod export;
mod serve;
mod pretrained;
mod reliability;

//! Integration tests: one binary, one module per area. They run the real `dinostream` binary on
//! temporary folders (see `util.rs`).

mod util;

mod cli;
mod export;

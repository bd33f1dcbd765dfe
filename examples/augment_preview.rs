//! Render the preview figure of one real patch from the test fixtures, until the `preview`
//! subcommand reads tiles itself:
//!
//! ```sh
//! cargo run --example augment_preview -- tests/fixtures/ben_patch.u16 120 docs/augment-preview.png [SEED] [BAND]
//! ```
//!
//! The input is a `[10, side, side]` little-endian u16 file in the seed's band order
//! (`tests/fixtures/gen_augment.py` writes them).

use anyhow::{Context, Result};
use dinostream::augment::{Augmenter, preview};
use dinostream::config::{AugmentConfig, SEED_BANDS};
use dinostream::tile::{Patch, Window};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, side, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: augment_preview INPUT.u16 SIDE OUT.png [SEED] [BAND]");
    };
    let side: usize = side.parse().context("SIDE")?;
    let seed: u64 = rest.first().map(|s| s.parse()).transpose().context("SEED")?.unwrap_or(0);
    let bytes = std::fs::read(input).with_context(|| format!("{input}: reading"))?;
    let data: Vec<f32> =
        bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 / 10000.0).collect();
    let bands: Vec<String> = SEED_BANDS.iter().map(|b| b.to_string()).collect();
    anyhow::ensure!(data.len() == bands.len() * side * side, "{input}: not [10, {side}, {side}] u16");
    let patch = Patch {
        data,
        bands: bands.clone(),
        height: side,
        width: side,
        source: input.into(),
        window: Window { x: 0, y: 0, width: side as u32, height: side as u32 },
        nodata_fraction: 0.0,
    };
    let augmenter = Augmenter::new(&AugmentConfig { seed, ..AugmentConfig::default() }, &bands)?;
    let views = augmenter.views(&patch, 0)?;
    let png = preview::render_png(&views, &bands, rest.get(1).map(String::as_str))?;
    std::fs::write(out, png).with_context(|| format!("{out}: writing"))?;
    Ok(())
}

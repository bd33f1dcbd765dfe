//! `train` over a folder larger than its cache (issue 14): one synthetic uint16 scene (10 bands,
//! strips of 16 rows, uncompressed) cut into about a million overlapping windows is indexed, then
//! walked in the order `train`'s feeder uses (a seeded shuffle of the index) through a cache of
//! `--cache-mb`. Prints the index build time and size, patches per CPU second of the walk, cache
//! hits and the peak RSS (VmHWM). `benches/run_train_index.sh` writes the scene, runs this and
//! then `train` on the same scene. Not a test: it prints numbers and asserts nothing.
//!
//! Usage: `cargo bench --bench train_index -- SCENE.tif [--write] [--size PX] [--patch PX]
//! [--stride PX] [--cache-mb MB] [--samples N] [--whole-rows]` (defaults 4000, 32, 4, 1024,
//! 20000; `--whole-rows` keeps a miss's whole patch row whatever the folder's size).

#[path = "../tests/tiff_writer.rs"]
mod tiff_writer;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use dinostream::config::{SEED_BANDS, TileConfig};
use dinostream::tile::{IndexedPatches, Input, PatchIndex};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use tiff_writer::{Codec, Sample, TiffSpec, write_tiff};

struct Args {
    scene: PathBuf,
    write: bool,
    size: u32,
    patch: usize,
    stride: usize,
    cache_mb: usize,
    samples: usize,
    whole_rows: bool,
}

fn parse() -> Args {
    let mut args = Args {
        scene: PathBuf::from("scene.tif"),
        write: false,
        size: 4000,
        patch: 32,
        stride: 4,
        cache_mb: 1024,
        samples: 20_000,
        whole_rows: false,
    };
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(arg) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<usize>().ok()).expect("a number after the flag");
        match arg.as_str() {
            "--write" => args.write = true,
            "--whole-rows" => args.whole_rows = true,
            "--size" => args.size = value() as u32,
            "--patch" => args.patch = value(),
            "--stride" => args.stride = value(),
            "--cache-mb" => args.cache_mb = value(),
            "--samples" => args.samples = value(),
            path => args.scene = PathBuf::from(path),
        }
    }
    args
}

fn main() {
    let args = parse();
    if args.write {
        write_scene(&args);
    }
    let cfg = TileConfig { patch_px: args.patch, stride_px: args.stride, ..TileConfig::default() };
    let input = Input::detect(&args.scene).expect("the scene exists (pass --write to make it)");
    let (started, cpu) = (Instant::now(), cpu_secs());
    let (index, failed) = PatchIndex::build(&[input], &cfg);
    assert!(failed.is_empty(), "{failed:?}");
    let (build, build_cpu) = (started.elapsed().as_secs_f64(), cpu_secs() - cpu);
    let (len, index_bytes) = (index.len(), index.bytes());
    println!(
        "index: {len} patches in {build:.1} s wall, {build_cpu:.1} s CPU = {:.0} patches per CPU s, {:.1} MB ({:.1} B/patch), VmHWM {:.0} MB",
        len as f64 / build_cpu,
        index_bytes as f64 / 1e6,
        index_bytes as f64 / len as f64,
        vm_hwm_mb()
    );
    let mut patches = IndexedPatches::new(index, &cfg, args.cache_mb << 20);
    if args.whole_rows {
        patches = patches.keep_whole_rows(true);
    }
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(0));
    let (started, cpu) = (Instant::now(), cpu_secs());
    let mut hits = 0;
    for &i in order.iter().take(args.samples) {
        hits += usize::from(patches.cache().contains(&i));
        std::hint::black_box(patches.get(i).expect("the scene reads"));
    }
    let (walk, walk_cpu) = (started.elapsed().as_secs_f64(), cpu_secs() - cpu);
    let n = args.samples.min(len);
    println!(
        "walk (whole rows {}): {n} shuffled patches through a {} MB cache in {walk:.1} s wall, {walk_cpu:.1} s CPU = {:.0} patches per CPU s, {:.1}% hits, cache {:.0} MB, VmHWM {:.0} MB",
        patches.keeps_whole_rows(),
        args.cache_mb,
        n as f64 / walk_cpu,
        100.0 * hits as f64 / n as f64,
        patches.cache().bytes() as f64 / 1e6,
        vm_hwm_mb()
    );
}

/// A `size`² scene of the 10 seed bands with non-zero, varying values.
fn write_scene(args: &Args) {
    let spec = TiffSpec {
        width: args.size,
        height: args.size,
        bands: SEED_BANDS.len() as u16,
        sample: Sample::U16,
        rows_per_strip: 16,
        codec: Codec::None,
        ..TiffSpec::default()
    };
    let file = std::fs::File::create(&args.scene).expect("the scene's folder is writable");
    let mut out = std::io::BufWriter::new(file);
    let value =
        |b: usize, y: usize, x: usize| (1 + (b * 7919 + y * 31 + x * 17 + (x * y) % 97) % 4000) as f64;
    write_tiff(&mut out, &spec, value).expect("the scene is written");
    out.flush().expect("the scene is written");
}

/// CPU time this thread has run, from `/proc/self/schedstat` (immune to other processes competing
/// for the cores, which wall time is not on a shared machine).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

/// Peak resident set size of this process, from `/proc/self/status`.
fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kb.unwrap_or(0.0) / 1024.0
}

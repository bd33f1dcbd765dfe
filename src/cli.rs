//! The command line: clap arguments, one function per subcommand. Raw arguments are resolved once
//! into a validated [`Config`] (file, then flags on top); each command then hands its stage the
//! section it needs. Only this module prints to stdout.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, TileConfig, parse_layout};
use crate::dino::StepReport;
use crate::infer::embed;
use crate::infer::features::{FeatureSource, class_indices};
use crate::infer::knn;
use crate::infer::runtime::{LibrarySearch, OnnxModel, Runtime};
use crate::service::train::{Progress, TrainJob};
use crate::tile;

/// Continual DINO self-supervised training on Sentinel-2 tiles.
#[derive(Debug, Parser)]
#[command(name = "dinostream", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file (see deploy/config.toml); defaults apply to keys it omits.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors in the log.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// Band layout override for commands that read tiles.
#[derive(Debug, Args)]
pub struct LayoutArg {
    /// Band names of stacked files: a preset (bigearthnet10, sentinel2-12, eurosat13) or a list
    /// such as B02,B03,B04 (overrides `tile.layout`).
    #[arg(long, value_name = "PRESET|B01,B02,...")]
    pub layout: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the effective configuration (file + defaults) as TOML after validating it.
    Config,
    /// Watch a folder and train continually: the service systemd runs (see deploy/).
    Serve(ServeArgs),
    /// Describe tiles and BigEarthNet folders: format, size, bands, layout, georeference, statistics.
    Inspect(InspectArgs),
    /// Describe a pretrained weight file for `--init`: format, keys, architecture, bands expected.
    InspectCheckpoint(InspectCheckpointArgs),
    /// Render the 8 augmented DINO views of one patch as a 2x4 PNG grid.
    Preview(PreviewArgs),
    /// Train DINO on the tiles of a folder (no watching) and write a checkpoint.
    Train(TrainArgs),
    /// Export a checkpoint's teacher backbone as ONNX (no verification; `serve` verifies).
    Export(ExportArgs),
    /// Embed tiles with an exported model: writes `[rows, D]` embeddings.npy and an index CSV.
    Embed(EmbedArgs),
    /// Evaluate frozen embeddings: weighted k-NN (k=20, T=0.07) and a linear probe.
    Eval(EvalArgs),
}

/// `dinostream preview --input TILE --out crops.png`
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// A tile or BigEarthNet folder; its first patch is shown.
    #[arg(long, value_name = "TILE")]
    pub input: PathBuf,
    /// The PNG to write.
    #[arg(long, value_name = "PNG")]
    pub out: PathBuf,
    /// Sample index seeding the views (same seed, same views).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Show one band in grey instead of false colour B04/B03/B02.
    #[arg(long, value_name = "BAND")]
    pub band: Option<String>,
    #[command(flatten)]
    pub layout: LayoutArg,
}

/// `dinostream train --data DIR --steps N`
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Folder of tiles and BigEarthNet folders (or one tile).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Optimizer steps (0 writes the initial, randomly initialised model).
    #[arg(long, value_name = "N")]
    pub steps: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Samples per step (overrides `train.batch_size`).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Folder for the final checkpoint.
    #[arg(long, value_name = "DIR", default_value = "checkpoint")]
    pub checkpoint: PathBuf,
    /// Stop early after this much training time (`90s`, `5m`, `2h`); the schedules still span `--steps`.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub time_limit: Option<std::time::Duration>,
    /// Write every step's loss, schedule values and collapse indicators to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    #[command(flatten)]
    pub layout: LayoutArg,
}

/// `90`, `90s`, `5m` or `2h`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit `{unit}`: use s, m or h (e.g. 5m)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration (e.g. 90s, 5m, 2h)"))?;
    std::time::Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
}

/// `dinostream inspect PATH...`
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// TIFF files, BigEarthNet patch folders, or folders holding them.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// One JSON object per input, one per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub layout: LayoutArg,
}

/// `dinostream inspect-checkpoint FILE`
#[derive(Debug, Args)]
pub struct InspectCheckpointArgs {
    /// A .pth/.pt or .safetensors weight file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `dinostream serve`: flags override the config file's keys of the same name.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Folder to watch for tiles (`stream.watch_dir`).
    #[arg(long, value_name = "DIR")]
    pub watch: Option<PathBuf>,
    /// Folder for the ledger, checkpoints and status.json (`serve.state_dir`).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Folder ONNX exports are published to (`serve.exports_dir`).
    #[arg(long, value_name = "DIR")]
    pub exports: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Stop cleanly with a checkpoint after this many steps in total (`serve.max_steps`).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
}

/// Which model to train where, for `train` and `serve`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model preset name or preset TOML path (`model.preset`), e.g. vit-tiny-p8.
    #[arg(long, value_name = "PRESET")]
    pub model: Option<String>,
    /// Where to train (`train.device`).
    #[arg(long, value_enum)]
    pub device: Option<crate::config::Device>,
    /// Matrix-product arithmetic (`train.precision`).
    #[arg(long, value_enum)]
    pub precision: Option<crate::config::Precision>,
    /// Start from pretrained weights (`model.init`; .pth/.pt/.safetensors, DINO or timm names);
    /// only when no checkpoint exists yet.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// Band names of the --init file's input channels (`model.init_bands`): rgb, ssl4eo-s12-13
    /// or a list such as B04,B03,B02.
    #[arg(long, value_name = "SET|B01,...")]
    pub init_bands: Option<String>,
}

impl ModelArgs {
    /// Put the flags given on top of `cfg` (validated by the caller).
    fn apply(&self, cfg: &mut Config) {
        if let Some(preset) = &self.model {
            cfg.model.preset = preset.clone();
        }
        if let Some(device) = self.device {
            cfg.train.device = device;
        }
        if let Some(precision) = self.precision {
            cfg.train.precision = precision;
        }
        if let Some(init) = &self.init {
            cfg.model.init = Some(init.clone());
        }
        if let Some(bands) = &self.init_bands {
            cfg.model.init_bands = Some(bands.clone());
        }
    }
}

impl ServeArgs {
    /// Put the flags given on top of `cfg` and validate the result.
    fn apply(&self, cfg: &mut Config) -> Result<(), ConfigError> {
        if let Some(dir) = &self.watch {
            cfg.stream.watch_dir = dir.clone();
        }
        if let Some(dir) = &self.state {
            cfg.serve.state_dir = dir.clone();
        }
        if let Some(dir) = &self.exports {
            cfg.serve.exports_dir = dir.clone();
        }
        self.model.apply(cfg);
        if let Some(n) = self.max_steps {
            cfg.serve.max_steps = Some(n);
        }
        revalidate(cfg)
    }
}

/// `serve`: run the service until SIGTERM/SIGINT or `--max-steps`.
fn serve(mut cfg: Config, args: &ServeArgs) -> Result<()> {
    args.apply(&mut cfg)?;
    crate::model::keep_freed_memory();
    let stop = crate::service::signal::StopFlag::from_signals()?;
    crate::service::serve(&cfg, stop)
}

/// Where to find ONNX Runtime and whether to use CUDA.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// libonnxruntime.so.1.* to load (else ORT_DYLIB_PATH, ./.venv, python3's onnxruntime).
    #[arg(long, value_name = "FILE")]
    pub onnxruntime: Option<PathBuf>,
    /// Run on the CUDA execution provider; an error if it cannot be used.
    #[arg(long)]
    pub cuda: bool,
}

/// `dinostream export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint folder holding model.safetensors.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Output ONNX file.
    #[arg(long, value_name = "FILE.onnx")]
    pub out: PathBuf,
    /// Input height and width (a multiple of the patch size); the positional embedding is resized
    /// as in training (bicubic, DINO's scale factor) and baked in. Default: the preset's size.
    #[arg(long, value_name = "PX")]
    pub image_size: Option<usize>,
    /// What the model input holds: reflectance (normalised inside the graph) or normalized.
    #[arg(long, default_value = "reflectance", value_parser = ["reflectance", "normalized"])]
    pub input_contract: String,
    /// Also output the patch tokens `[N, L, D]`.
    #[arg(long)]
    pub patch_tokens: bool,
}

/// `dinostream embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Exported model (e.g. exports/latest.onnx).
    #[arg(long, value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Tiles, or folders searched for *.tif / *.tiff.
    #[arg(long, required = true, num_args = 1.., value_name = "DIR|TILE")]
    pub input: Vec<PathBuf>,
    /// Output .npy; the index CSV goes beside it with the extension .csv.
    #[arg(long, value_name = "FILE.npy")]
    pub out: PathBuf,
    #[command(flatten)]
    pub layout: LayoutArg,
    /// Inputs per ONNX Runtime call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `dinostream eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Exported model; not needed with `--baseline band-stats`.
    #[arg(long, value_name = "MODEL.onnx", required_unless_present = "baseline")]
    pub model: Option<PathBuf>,
    /// Folder of the labelled bank (training) tiles.
    #[arg(long, value_name = "DIR")]
    pub bank: PathBuf,
    /// Bank labels CSV (`filename,label,...`, paths relative to --bank).
    #[arg(long, value_name = "CSV")]
    pub labels: PathBuf,
    /// Folder of the query (test) tiles.
    #[arg(long, value_name = "DIR")]
    pub query: PathBuf,
    /// Query labels CSV.
    #[arg(long, value_name = "CSV")]
    pub query_labels: PathBuf,
    #[command(flatten)]
    pub layout: LayoutArg,
    /// Use per-band mean/std features instead of a model.
    #[arg(long, value_name = "MODE", value_parser = ["band-stats"])]
    pub baseline: Option<String>,
    /// Inputs per ONNX Runtime call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Parse the process arguments (exits with usage help on error, as clap does).
pub fn parse() -> Cli {
    Cli::parse()
}

/// Start env_logger on stderr: info by default, no colours when stderr is not a terminal.
pub fn init_logging(cli: &Cli) {
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env).format_timestamp_millis().try_init();
}

/// Exit status for an error: 78 (EX_CONFIG) for configuration problems, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.downcast_ref::<ConfigError>().is_some()) { 78 } else { 1 }
}

/// Run one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let mut cfg = load_config(&cli.global)?;
    match cli.command {
        Command::Config => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Command::Serve(args) => serve(cfg, &args),
        Command::Inspect(args) => inspect(cfg, &args),
        Command::InspectCheckpoint(args) => inspect_checkpoint(&args),
        Command::Preview(args) => preview(cfg, &args),
        Command::Train(args) => train(cfg, &args),
        Command::Export(args) => export_command(&args),
        Command::Embed(args) => {
            apply_layout(&mut cfg, &args.layout)?;
            embed_command(&args, &cfg.tile)
        }
        Command::Eval(args) => {
            apply_layout(&mut cfg, &args.layout)?;
            eval_command(&args, &cfg.tile)
        }
    }
}

/// `dinostream inspect-checkpoint FILE`: what a pretrained file holds, for `--init`.
fn inspect_checkpoint(args: &InspectCheckpointArgs) -> Result<()> {
    let file = crate::model::pretrained::WeightFile::read(&args.file)?;
    for line in crate::model::pretrained::describe(&file)? {
        println!("{line}");
    }
    Ok(())
}

/// `inspect`: describe every input; a bad one prints `path: reason` and the rest go on. Fails at
/// the end when any input failed.
fn inspect(mut cfg: Config, args: &InspectArgs) -> Result<()> {
    apply_layout(&mut cfg, &args.layout)?;
    let mut failed = 0usize;
    for path in &args.paths {
        for input in expand_inputs(path, &mut failed) {
            match tile::inspect(&input, &cfg.tile) {
                Ok(info) if args.json => println!("{}", serde_json::to_string(&info)?),
                Ok(info) => print!("{}", render_info(&info)),
                Err(err) => {
                    failed += 1;
                    eprintln!("{err}");
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} input(s) could not be read");
    }
    Ok(())
}

/// `preview`: augment the first patch of the input and write the 2x4 grid.
fn preview(mut cfg: Config, args: &PreviewArgs) -> Result<()> {
    apply_layout(&mut cfg, &args.layout)?;
    let input = tile::Input::detect(&args.input)?;
    let mut first = None;
    tile::for_each_patch(&input, &cfg.tile, |patch| {
        first = Some(patch);
        std::ops::ControlFlow::Break(())
    })?;
    let patch = first.with_context(|| format!("{}: no usable patch", args.input.display()))?;
    let augmenter = crate::augment::Augmenter::new(&cfg.augment, &cfg.tile.bands)?;
    let views = augmenter.views(&patch, args.seed)?;
    let png = crate::augment::preview::render_png(&views, &cfg.tile.bands, args.band.as_deref())?;
    std::fs::write(&args.out, png).with_context(|| format!("{}: cannot write", args.out.display()))?;
    println!("{}: {} views of {}", args.out.display(), views.views.len(), args.input.display());
    Ok(())
}

/// `train`: the flags override their config keys, then the run reports through a progress bar.
fn train(mut cfg: Config, args: &TrainArgs) -> Result<()> {
    apply_layout(&mut cfg, &args.layout)?;
    args.model.apply(&mut cfg);
    if let Some(batch_size) = args.batch_size {
        cfg.train.batch_size = batch_size;
    }
    revalidate(&cfg)?;
    crate::model::keep_freed_memory();
    let job = TrainJob {
        data: args.data.clone(),
        steps: args.steps,
        checkpoint: args.checkpoint.clone(),
        time_limit: args.time_limit,
        metrics: args.metrics.clone(),
    };
    let mut bar = StepBar::new(args.steps as u64, cfg.train.log_every_steps as u64);
    let last = crate::service::train::run(&cfg, &job, &mut bar)?;
    bar.bar.finish_and_clear();
    match last {
        Some(last) => {
            println!(
                "step {}: loss {}; checkpoint in {}",
                last.step,
                shown(last.loss),
                args.checkpoint.display()
            )
        }
        None => println!("step 0 (initial weights); checkpoint in {}", args.checkpoint.display()),
    }
    Ok(())
}

/// A loss for people: four decimals, or "n/a" before the first one is read.
fn shown(loss: Option<f32>) -> String {
    loss.map_or_else(|| "n/a".to_string(), |l| format!("{l:.4}"))
}

/// A progress bar on a terminal, plus one log line every `log_every` steps (what journald sees).
struct StepBar {
    bar: indicatif::ProgressBar,
    log_every: u64,
    /// The last loss read (the trainer reads it every `log_every_steps` steps).
    loss: Option<f32>,
}

impl StepBar {
    fn new(steps: u64, log_every: u64) -> StepBar {
        let bar = indicatif::ProgressBar::new(steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        StepBar { bar, log_every: log_every.max(1), loss: None }
    }
}

impl Progress for StepBar {
    fn step(&mut self, r: &StepReport, samples_per_sec: f64) {
        self.loss = r.loss.or(self.loss);
        let line = format!("loss {} lr {:.2e} {samples_per_sec:.1} samples/s", shown(self.loss), r.lr);
        self.bar.set_position(r.step);
        self.bar.set_message(line.clone());
        if r.step % self.log_every == 0 || r.collapse.is_some() {
            let collapse = r.collapse.map(|c| {
                format!(
                    "; teacher entropy/lnK {:.3}, KL(t||s) {:.3}, cls std {:.4} (uniform {:.4})",
                    c.teacher_entropy_ratio, c.kl_teacher_student, c.teacher_cls_std, c.uniform_cls_std
                )
            });
            self.bar.suspend(|| log::info!("step {}: {line}{}", r.step, collapse.unwrap_or_default()));
        }
    }
}

/// Re-check the configuration after flags changed it.
fn revalidate(cfg: &Config) -> Result<(), ConfigError> {
    cfg.validate().map_err(|errors| ConfigError::Invalid { path: None, errors })
}

/// The inputs a command-line path stands for: itself, or what a plain folder holds.
fn expand_inputs(path: &Path, failed: &mut usize) -> Vec<tile::Input> {
    let found = match tile::Input::detect(path) {
        Err(tile::TileError::NotAnInput { .. }) if path.is_dir() => tile::list_inputs(path),
        other => other.map(|i| vec![i]),
    };
    let found = found.unwrap_or_else(|err| {
        *failed += 1;
        eprintln!("{err}");
        Vec::new()
    });
    if found.is_empty() && path.is_dir() {
        *failed += 1;
        eprintln!(
            "{}: a folder holding no TIFF files (*.tif, *.tiff) and no BigEarthNet patch folders",
            path.display()
        );
    }
    found
}

/// Human-readable `inspect` output for one input.
fn render_info(info: &tile::InputInfo) -> String {
    let mut s = format!("{}\n", info.path.display());
    s += &format!("  format       {}\n", info.format);
    s += &format!("  size         {} x {} px, {} bands\n", info.width, info.height, info.bands.len());
    s += &format!("  data type    {}\n", info.data_type);
    s += &format!("  compression  {}\n", info.compression);
    s += &format!("  layout       {}, {}\n", info.interleave, info.chunking);
    if let Some(g) = &info.georef {
        let pair = |p: Option<[f64; 2]>| p.map(|[a, b]| format!("{a}, {b}")).unwrap_or_else(|| "-".into());
        let epsg = g.epsg.map(|e| format!("EPSG:{e}")).unwrap_or_else(|| "unknown CRS".into());
        s +=
            &format!("  georef       {epsg}, pixel size {}, origin {}\n", pair(g.pixel_size), pair(g.origin));
    }
    let nodata = info.nodata.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    s += &format!("  nodata       {nodata}\n");
    if !info.labels.is_empty() {
        s += &format!("  labels       {}\n", info.labels.join("; "));
    }
    if let Some(note) = &info.band_names_note {
        s += &format!("  band names   by index: {note}\n");
    }
    let width = info.bands.iter().map(|b| b.name.len()).max().unwrap_or(0).max(5);
    s += &format!("  {:<width$} size       min      mean     max   (reflectance)\n", "band");
    for b in &info.bands {
        let size = format!("{}x{}", b.width, b.height);
        s += &format!("  {:<width$} {size:<9} {:8.4} {:8.4} {:8.4}\n", b.name, b.min, b.mean, b.max);
    }
    s
}

/// `dinostream export`: checkpoint -> ONNX file (written atomically).
fn export_command(args: &ExportArgs) -> Result<()> {
    let path = args.checkpoint.join("model.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let contract = args.input_contract.parse().map_err(anyhow::Error::msg)?;
    let (mut spec, mut weights) =
        crate::export::from_checkpoint(&bytes, contract).with_context(|| path.display().to_string())?;
    if let Some(px) = args.image_size.filter(|px| *px != spec.img_size) {
        if px % spec.patch_size != 0 {
            anyhow::bail!("--image-size {px}: must be a multiple of the patch size {}", spec.patch_size);
        }
        let (shape, data) = resized_pos_embed(&args.checkpoint, px)?;
        weights.insert("pos_embed", shape, data);
        spec.img_size = px;
    }
    spec.patch_tokens = args.patch_tokens;
    let onnx = crate::export::export_bytes(&spec, &weights)?;
    crate::fsio::write_atomic(&args.out, &onnx).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}: step {} of {} ({} bytes)", args.out.display(), spec.step, spec.preset, onnx.len());
    Ok(())
}

/// The teacher's positional embedding resized for `px` x `px` inputs exactly as in training
/// (DINO's bicubic `interpolate_pos_encoding`), baked into the export.
fn resized_pos_embed(checkpoint: &Path, px: usize) -> Result<(Vec<usize>, Vec<f32>)> {
    let trainer = crate::dino::checkpoint::load(checkpoint, &candle_core::Device::Cpu)?;
    let pos = trainer.teacher().backbone.interpolate_pos_encoding(px, px)?;
    Ok((pos.dims().to_vec(), pos.flatten_all()?.to_vec1::<f32>()?))
}

/// Open `model` through the shared ONNX Runtime.
fn open_model(model: &Path, rt: &RuntimeArgs) -> Result<OnnxModel> {
    let runtime = Runtime::get(&LibrarySearch::standard(rt.onnxruntime.clone()))?;
    Ok(runtime.open(model, rt.cuda)?)
}

/// `dinostream embed`: every input's patches through the model, in batches, with a progress bar.
fn embed_command(args: &EmbedArgs, tile: &TileConfig) -> Result<()> {
    let mut model = open_model(&args.model, &args.runtime)?;
    let meta = model.metadata()?;
    let mut failed = 0;
    let files: Vec<tile::Input> = args.input.iter().flat_map(|p| expand_inputs(p, &mut failed)).collect();
    if failed > 0 {
        anyhow::bail!("{failed} input(s) could not be listed");
    }
    let mut inputs = Vec::new();
    for file in &files {
        for patch in tile::read_patches(file, tile)? {
            inputs.extend(embed::prepare(&patch, &meta)?);
        }
    }
    let bar = indicatif::ProgressBar::new(inputs.len() as u64);
    let out =
        embed::embed_inputs(&mut model, &meta, &inputs, args.batch, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    embed::write_npy(&args.out, &out.values, out.rows(), out.dim)?;
    let index = args.out.with_extension("csv");
    embed::write_index_csv(&index, &out.index)?;
    println!(
        "{}: {} embeddings of dim {} ({} files); index {}",
        args.out.display(),
        out.rows(),
        out.dim,
        files.len(),
        index.display()
    );
    Ok(())
}

/// `dinostream eval`: features for bank and query, then k-NN and linear-probe accuracy.
fn eval_command(args: &EvalArgs, tile: &TileConfig) -> Result<()> {
    let bank = read_label_file(&args.labels)?;
    let query = read_label_file(&args.query_labels)?;
    let mut classes: Vec<String> = bank.iter().chain(&query).flat_map(|f| f.labels.clone()).collect();
    classes.sort();
    classes.dedup();
    let mut features = match (&args.baseline, &args.model) {
        (Some(_), _) => FeatureSource::BandStats,
        (None, Some(model)) => FeatureSource::Model(Box::new(open_model(model, &args.runtime)?)),
        (None, None) => anyhow::bail!("eval: pass --model M.onnx or --baseline band-stats"),
    };
    let (xb, d) = features.of(&args.bank, &bank, tile, args.batch)?;
    let (xq, _) = features.of(&args.query, &query, tile, args.batch)?;
    println!(
        "features: {} (dim {d}); bank {} files, query {} files",
        features.name(),
        bank.len(),
        query.len()
    );
    let split = EvalSplit { xb: &xb, bank: &bank, xq: &xq, query: &query, d, classes: &classes };
    if bank.iter().chain(&query).any(|f| f.labels.len() != 1) {
        print_multilabel_eval(&split);
    } else {
        print_single_label_eval(&split);
    }
    Ok(())
}

/// What eval compares: bank and query features `[files, d]` with their labelled files, and the
/// classes found in both.
struct EvalSplit<'a> {
    xb: &'a [f32],
    bank: &'a [knn::LabelledFile],
    xq: &'a [f32],
    query: &'a [knn::LabelledFile],
    d: usize,
    classes: &'a [String],
}

/// k-NN and linear-probe accuracy, per class and overall.
fn print_single_label_eval(split: &EvalSplit) {
    let EvalSplit { xb, bank, xq, query, d, classes } = *split;
    let (yb, yq) = (class_indices(bank, classes), class_indices(query, classes));
    let report = knn::evaluate(xb, &yb, xq, &yq, d, classes.len());
    println!("{:<24} {:>8} {:>8} {:>6}", "class", "knn", "linear", "n");
    for (c, name) in classes.iter().enumerate() {
        let (k, l) = (report.knn.per_class[c], report.linear.per_class[c]);
        let pct = |(ok, n): (usize, usize)| if n == 0 { f64::NAN } else { 100.0 * ok as f64 / n as f64 };
        println!("{name:<24} {:>7.1}% {:>7.1}% {:>6}", pct(k), pct(l), k.1);
    }
    let (k, l) = (100.0 * report.knn.overall, 100.0 * report.linear.overall);
    println!("{:<24} {k:>7.1}% {l:>7.1}% {:>6}", "overall", yq.len());
}

/// Multi-label (BigEarthNet) weighted k-NN: micro mAP and micro F1 at 0.5.
fn print_multilabel_eval(split: &EvalSplit) {
    let EvalSplit { xb, bank, xq, query, d, classes } = *split;
    let targets = |files: &[knn::LabelledFile]| -> Vec<f32> {
        files.iter().flat_map(|f| classes.iter().map(|c| f32::from(u8::from(f.labels.contains(c))))).collect()
    };
    let (mut xb, mut xq) = (xb.to_vec(), xq.to_vec());
    knn::l2_normalize_rows(&mut xb, d);
    knn::l2_normalize_rows(&mut xq, d);
    let scores =
        knn::knn_multilabel_scores(&xb, &targets(bank), &xq, d, classes.len(), knn::K, knn::TEMPERATURE);
    let truth = targets(query);
    let map = knn::micro_average_precision(&scores, &truth).unwrap_or(f64::NAN);
    println!(
        "multi-label weighted k-NN over {} classes: micro mAP {:.1}%, micro F1@0.5 {:.1}%",
        classes.len(),
        100.0 * map,
        100.0 * knn::micro_f1(&scores, &truth, 0.5)
    );
}

fn read_label_file(path: &Path) -> Result<Vec<knn::LabelledFile>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    knn::read_labels(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The config file if given, else the defaults; validated either way.
fn load_config(global: &GlobalArgs) -> Result<Config, ConfigError> {
    match &global.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    }
}

/// Apply `--layout` on top of the config and re-validate it.
fn apply_layout(cfg: &mut Config, layout: &LayoutArg) -> Result<(), ConfigError> {
    if let Some(spec) = &layout.layout {
        parse_layout(spec).map_err(|reason| ConfigError::Invalid {
            path: None,
            errors: vec![crate::config::KeyError { key: "--layout".into(), reason }],
        })?;
        cfg.tile.layout = spec.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_errors_exit_with_ex_config() {
        let err = anyhow::Error::new(ConfigError::Invalid { path: None, errors: vec![] });
        assert_eq!(exit_code(&err), 78);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        let secs = |t: &str| parse_duration(t).map(|d| d.as_secs_f64());
        assert_eq!(secs("90"), Ok(90.0));
        assert_eq!(secs("90s"), Ok(90.0));
        assert_eq!(secs("1.5m"), Ok(90.0));
        assert_eq!(secs("2h"), Ok(7200.0));
        assert!(secs("5 min").unwrap_err().contains("unit"));
        assert!(secs("m").unwrap_err().contains("not a duration"));
        assert!(secs("-1s").is_err());
    }
}

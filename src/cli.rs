//! The command line: clap arguments, one function per subcommand. Raw arguments are resolved once
//! into a validated [`Config`] (file, then flags on top); each command then hands its stage the
//! section it needs. Only this module prints to stdout.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, parse_layout};
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
    /// Model preset name or TOML path (`model.preset`), e.g. vit-tiny-p8.
    #[arg(long, value_name = "PRESET")]
    pub model: Option<String>,
    /// Where to train (`train.device`).
    #[arg(long, value_enum)]
    pub device: Option<crate::config::Device>,
    /// Stop cleanly with a checkpoint after this many steps in total (`serve.max_steps`).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
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
        if let Some(preset) = &self.model {
            cfg.model.preset = preset.clone();
        }
        if let Some(device) = self.device {
            cfg.train.device = device;
        }
        if let Some(n) = self.max_steps {
            cfg.serve.max_steps = Some(n);
        }
        cfg.validate().map_err(|errors| ConfigError::Invalid { path: None, errors })
    }
}

/// `serve`: run the service until SIGTERM/SIGINT or `--max-steps`.
fn serve(mut cfg: Config, args: &ServeArgs) -> Result<()> {
    args.apply(&mut cfg)?;
    let stop = crate::service::signal::StopFlag::from_signals()?;
    crate::service::serve(&cfg, stop)
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
    let cfg = load_config(&cli.global)?;
    match cli.command {
        Command::Config => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Command::Serve(args) => serve(cfg, &args),
        Command::Inspect(args) => inspect(cfg, &args),
    }
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

/// The inputs a command-line path stands for: itself, or what a plain folder holds.
fn expand_inputs(path: &Path, failed: &mut usize) -> Vec<tile::Input> {
    let found = match tile::Input::detect(path) {
        Err(tile::TileError::NotAnInput { .. }) if path.is_dir() => tile::list_inputs(path),
        other => other.map(|i| vec![i]),
    };
    found.unwrap_or_else(|err| {
        *failed += 1;
        eprintln!("{err}");
        Vec::new()
    })
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
    s += "  band  size       min      mean     max   (reflectance)\n";
    for b in &info.bands {
        let size = format!("{}x{}", b.width, b.height);
        s += &format!("  {:<5} {size:<9} {:8.4} {:8.4} {:8.4}\n", b.name, b.min, b.mean, b.max);
    }
    s
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
}

//! Why an input could not be ingested: one [`TileError`] per failure, naming the file, the reason
//! and what to do. [`TileError::kind`] gives a short stable word for quarantine records.

use std::path::{Path, PathBuf};

/// An input that could not be read. Every variant carries the offending file or folder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TileError {
    /// The file disappeared between listing and reading.
    #[error("{}: file vanished while reading it; it was moved or deleted by another process", path.display())]
    Vanished { path: PathBuf },
    /// Any other operating-system read failure.
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A zero-byte file (often a copy still in progress).
    #[error("{}: file is empty (0 bytes); wait until the copy has finished", path.display())]
    Empty { path: PathBuf },
    /// The bytes do not start with a TIFF header.
    #[error("{}: not a TIFF file (header {header}); dinostream reads GeoTIFFs and BigEarthNet folders", path.display())]
    NotTiff { path: PathBuf, header: String },
    /// The file ends before the data it declares.
    #[error("{}: truncated: {detail}; the copy is incomplete, copy the file again", path.display())]
    Truncated { path: PathBuf, detail: String },
    /// Structurally invalid TIFF.
    #[error("{}: corrupt TIFF: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// A valid TIFF that uses something dinostream does not decode.
    #[error("{}: unsupported: {detail}; convert it, e.g. `gdal_translate -ot UInt16 -co COMPRESS=DEFLATE`", path.display())]
    Unsupported { path: PathBuf, detail: String },
    /// Declared dimensions beyond the configured limits (refused before allocating).
    #[error("{}: too large: {detail}; raise tile.max_width_px/max_height_px/max_bands or split the file", path.display())]
    TooLarge { path: PathBuf, detail: String },
    /// A strip or tile inflates to more bytes than the image declares.
    #[error("{}: decompression bomb: chunk {chunk} inflates to more than the {declared_bytes} bytes it declares", path.display())]
    DecompressionBomb { path: PathBuf, chunk: u32, declared_bytes: u64 },
    /// The file's band count does not match the layout that names its bands.
    #[error(
        "{}: {found} bands but layout `{layout}` has {expected}; pass `--layout {hint}` or set `tile.layout`",
        path.display()
    )]
    BandCount { path: PathBuf, found: usize, layout: String, expected: usize, hint: String },
    /// A configured band is not in the input.
    #[error("{}: missing band {band} (input has {}); change `tile.bands` or `--layout`", path.display(), available.join(","))]
    MissingBand { path: PathBuf, band: String, available: Vec<String> },
    /// Bands of one input do not share a grid.
    #[error("{}: band sizes inconsistent: {detail}", path.display())]
    BandSizes { path: PathBuf, detail: String },
    /// The TIFF decoder panicked (a decoder bug, e.g. image-tiff#403 on tiled planar files).
    #[error("{}: TIFF decoder failed on this layout ({message}); rewrite it with `gdal_translate -co INTERLEAVE=PIXEL`", path.display())]
    DecoderPanic { path: PathBuf, message: String },
    /// Neither a TIFF file nor a BigEarthNet patch folder.
    #[error("{}: not an ingestible input: {detail}", path.display())]
    NotAnInput { path: PathBuf, detail: String },
    /// An indexed input no longer holds the patch its index entry names.
    #[error("{}: changed since it was indexed: {detail}; leave the folder unchanged while `train` runs", path.display())]
    Changed { path: PathBuf, detail: String },
}

impl TileError {
    /// A short stable word for logs and quarantine records (`truncated`, `not_tiff`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            TileError::Vanished { .. } => "vanished",
            TileError::Io { .. } => "io",
            TileError::Empty { .. } => "empty",
            TileError::NotTiff { .. } => "not_tiff",
            TileError::Truncated { .. } => "truncated",
            TileError::Corrupt { .. } => "corrupt",
            TileError::Unsupported { .. } => "unsupported",
            TileError::TooLarge { .. } => "too_large",
            TileError::DecompressionBomb { .. } => "decompression_bomb",
            TileError::BandCount { .. } => "band_count",
            TileError::MissingBand { .. } => "missing_band",
            TileError::BandSizes { .. } => "band_sizes",
            TileError::DecoderPanic { .. } => "decoder_panic",
            TileError::NotAnInput { .. } => "not_input",
            TileError::Changed { .. } => "changed",
        }
    }

    /// The file or folder the error is about.
    pub fn path(&self) -> &Path {
        match self {
            TileError::Vanished { path }
            | TileError::Io { path, .. }
            | TileError::Empty { path }
            | TileError::NotTiff { path, .. }
            | TileError::Truncated { path, .. }
            | TileError::Corrupt { path, .. }
            | TileError::Unsupported { path, .. }
            | TileError::TooLarge { path, .. }
            | TileError::DecompressionBomb { path, .. }
            | TileError::BandCount { path, .. }
            | TileError::MissingBand { path, .. }
            | TileError::BandSizes { path, .. }
            | TileError::DecoderPanic { path, .. }
            | TileError::NotAnInput { path, .. }
            | TileError::Changed { path, .. } => path,
        }
    }

    /// Classify an I/O error on `path`.
    pub(crate) fn io(path: &Path, source: std::io::Error) -> TileError {
        let path = path.to_path_buf();
        match source.kind() {
            std::io::ErrorKind::NotFound => TileError::Vanished { path },
            std::io::ErrorKind::UnexpectedEof => TileError::Truncated { path, detail: source.to_string() },
            std::io::ErrorKind::InvalidData => TileError::Corrupt { path, detail: source.to_string() },
            _ => TileError::Io { path, source },
        }
    }

    /// Classify an error of the `tiff` crate on `path`.
    pub(crate) fn tiff(path: &Path, err: tiff::TiffError) -> TileError {
        use tiff::TiffError as T;
        let detail = err.to_string();
        let path_buf = path.to_path_buf();
        match err {
            // Decompressors report bad streams as I/O errors without an OS error code.
            T::IoError(source)
                if source.raw_os_error().is_none()
                    && !matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                    ) =>
            {
                TileError::Corrupt { path: path_buf, detail: source.to_string() }
            }
            T::IoError(source) => TileError::io(path, source),
            T::FormatError(_) if detail.contains("end of file") || detail.contains("EOF") => {
                TileError::Truncated { path: path_buf, detail }
            }
            T::FormatError(_) | T::IntSizeError | T::UsageError(_) => {
                TileError::Corrupt { path: path_buf, detail }
            }
            T::UnsupportedError(_) => TileError::Unsupported { path: path_buf, detail },
            T::LimitsExceeded => TileError::TooLarge {
                path: path_buf,
                detail: "a strip, tile or tag is larger than the decoder limits".into(),
            },
        }
    }
}

//! Where a TIFF's strips or tiles lie, checked against the file before any is decoded.
//!
//! The `tiff` crate reads what the offsets and byte counts say: a byte count of 0 or 1, an offset
//! of 0 or one pointing into the image file directory, or an uncompressed strip declared a
//! thousand times too long would decode to garbage pixels without an error. Here every chunk must
//! be non-empty, lie inside the file, stay clear of the header and the first IFD, and, when
//! uncompressed, hold exactly the bytes of its rows.

use std::ops::Range;
use std::path::Path;

use super::TileError;

/// What the chunks are checked against.
pub(crate) struct ChunkLayout<'a> {
    /// `strip` or `tile`, for messages.
    pub noun: &'static str,
    /// File offset of each chunk.
    pub offsets: &'a [u64],
    /// Byte count of each chunk.
    pub counts: &'a [u64],
    /// The file's length in bytes.
    pub file_len: u64,
    /// The header and the first IFD (its entries and next-IFD pointer).
    pub reserved: [Range<u64>; 2],
    /// For uncompressed files: the bytes chunk `i` decodes to, and the largest count accepted
    /// (a last strip padded to the full rows per strip). `None` for compressed files.
    pub raw_bytes: Option<&'a dyn Fn(usize) -> (u64, u64)>,
}

/// Check every chunk of `layout` (see the module doc).
pub(crate) fn check(path: &Path, layout: &ChunkLayout) -> Result<(), TileError> {
    let corrupt = |detail: String| Err(TileError::Corrupt { path: path.to_path_buf(), detail });
    let noun = layout.noun;
    if layout.offsets.len() != layout.counts.len() {
        return corrupt(format!(
            "{} {noun} offsets but {} byte counts",
            layout.offsets.len(),
            layout.counts.len()
        ));
    }
    for (i, (&offset, &count)) in layout.offsets.iter().zip(layout.counts).enumerate() {
        if count == 0 {
            return corrupt(format!("{noun} {i} is declared empty (byte count 0)"));
        }
        let end = offset.saturating_add(count);
        if let Some(r) = layout.reserved.iter().find(|r| offset < r.end && r.start < end) {
            return corrupt(format!(
                "{noun} {i} (bytes {offset}..{end}) overlaps the TIFF header or directory (bytes {}..{})",
                r.start, r.end
            ));
        }
        if end > layout.file_len {
            return Err(TileError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "{noun} {i} ends at byte {end}, past the end of the file ({} bytes)",
                    layout.file_len
                ),
            });
        }
        if let Some(raw_bytes) = layout.raw_bytes {
            let (exact, padded) = raw_bytes(i);
            if count != exact && count != padded {
                return corrupt(format!(
                    "uncompressed {noun} {i} declares {count} bytes, but its pixels take {exact}"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout<'a>(
        offsets: &'a [u64],
        counts: &'a [u64],
        raw: Option<&'a dyn Fn(usize) -> (u64, u64)>,
    ) -> ChunkLayout<'a> {
        ChunkLayout {
            noun: "strip",
            offsets,
            counts,
            file_len: 1000,
            reserved: [0..8, 900..950],
            raw_bytes: raw,
        }
    }

    #[test]
    fn empty_misplaced_overlong_or_missized_chunks_are_errors() {
        let raw = |_| (100, 100);
        let ok = check(Path::new("x.tif"), &layout(&[8, 108], &[100, 100], Some(&raw)));
        assert!(ok.is_ok(), "{ok:?}");
        for (offsets, counts, kind, says) in [
            ([8, 108], [100, 0], "corrupt", "declared empty"),
            ([0, 108], [100, 100], "corrupt", "overlaps"),
            ([8, 880], [100, 100], "corrupt", "overlaps"),
            ([8, 960], [100, 100], "truncated", "past the end"),
            ([8, 108], [100, 1], "corrupt", "declares 1 bytes"),
        ] {
            let err = check(Path::new("x.tif"), &layout(&offsets, &counts, Some(&raw))).unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
        let compressed = check(Path::new("x.tif"), &layout(&[8, 108], &[100, 1], None));
        assert!(compressed.is_ok(), "a compressed strip may be short");
    }
}

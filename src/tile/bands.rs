//! Per-band normalisation statistics, looked up by band name.

/// Mean and standard deviation of one band, in reflectance units (DN / 10000).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandStats {
    /// Mean reflectance.
    pub mean: f32,
    /// Standard deviation of reflectance.
    pub std: f32,
}

/// BigEarthNet statistics in DN (the seed's `BAND_STATS['S2']`), as `(band, mean, std)`.
const BIGEARTHNET_DN: [(&str, f64, f64); 10] = [
    ("B02", 429.9430203, 572.41639287),
    ("B03", 614.21682446, 582.87945694),
    ("B04", 590.23569706, 675.88746967),
    ("B05", 950.68368468, 729.89827633),
    ("B06", 1792.46290469, 1096.01480586),
    ("B07", 2075.46795189, 1273.45393088),
    ("B08", 2218.94553375, 1365.45589904),
    ("B8A", 2266.46036911, 1356.13789355),
    ("B11", 1594.42694882, 1079.19066363),
    ("B12", 1009.32729131, 818.86747235),
];

/// The seed's normalisation statistics for `band` in reflectance, or `None` for a band the seed
/// has no statistics for (B01, B09, B10).
pub fn band_stats(band: &str) -> Option<BandStats> {
    BIGEARTHNET_DN
        .iter()
        .find(|(name, _, _)| *name == band)
        .map(|&(_, mean, std)| BandStats { mean: (mean / 10000.0) as f32, std: (std / 10000.0) as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_follow_the_band_name_not_the_position() {
        // The seed's channel 6 is B11: it must get B11's numbers, not B08's.
        let b11 = band_stats("B11").unwrap();
        assert!((b11.mean - 0.159_442_7).abs() < 1e-6);
        assert!((b11.std - 0.107_919_07).abs() < 1e-6);
        assert!(band_stats("B01").is_none());
    }
}

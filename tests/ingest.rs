//! Ingest on real data: the bundled EuroSAT and BigEarthNet samples, every file of
//! `../shared/data` when present, layouts and codecs that must decode alike, a corpus of broken
//! files that must each give their own error, and `dinostream inspect` as a user runs it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use dinostream::config::{TileConfig, parse_layout};
use dinostream::tile::{self, Input, InputKind, Patch, TileError};

use crate::tiff_writer::{Codec, Sample, TiffSpec, tiff_bytes};
use crate::util::*;

const EUROSAT: [&str; 4] = [
    "AnnualCrop/AnnualCrop_1.tif",
    "Forest/Forest_1.tif",
    "Residential/Residential_1.tif",
    "SeaLake/SeaLake_8.tif",
];
const BEN_V1: &str = "bigearthnet-s2/S2A_MSIL2A_20170617T113321_4_55";
const BEN_V2: &str = "bigearthnet-s2/S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57";

fn eurosat_cfg() -> TileConfig {
    TileConfig { layout: "eurosat13".into(), ..TileConfig::default() }
}

/// All 13 EuroSAT bands in file order, so patches hold the file's values unchanged.
fn all_bands_cfg() -> TileConfig {
    TileConfig { bands: parse_layout("eurosat13").unwrap(), ..eurosat_cfg() }
}

pub(crate) fn patches(path: &Path, cfg: &TileConfig) -> Result<Vec<Patch>, TileError> {
    tile::read_patches(&Input::detect(path)?, cfg)
}

fn eurosat(name: &str) -> PathBuf {
    data("eurosat-ms").join(name)
}

// ---------------------------------------------------------------- statistics against tifffile

/// `tests/data/expected.py`, line A (tifffile; min, mean, max of DN / 10000 per band, file order).
/// EPSG codes as tifffile's `geotiff_metadata['ProjectedCSTypeGeoKey']` reads them.
const EUROSAT_EPSG: [u64; 2] = [32635, 32632];

const EUROSAT_STATS: [(&str, [[f64; 3]; 13]); 2] = [
    (
        "AnnualCrop/AnnualCrop_1.tif",
        [
            [0.1235, 0.13232, 0.142],
            [0.1002, 0.112451, 0.1534],
            [0.0905, 0.104473, 0.1664],
            [0.0893, 0.116928, 0.2297],
            [0.1034, 0.129163, 0.2128],
            [0.112, 0.155375, 0.2376],
            [0.1238, 0.176567, 0.2689],
            [0.1186, 0.174896, 0.2977],
            [0.0353, 0.048406, 0.0631],
            [0.0009, 0.001157, 0.0014],
            [0.2248, 0.27154, 0.349],
            [0.1236, 0.198089, 0.2537],
            [0.1404, 0.203055, 0.3108],
        ],
    ),
    (
        "SeaLake/SeaLake_8.tif",
        [
            [0.1123, 0.114272, 0.1167],
            [0.0782, 0.08198, 0.0862],
            [0.0508, 0.054439, 0.0605],
            [0.0289, 0.03285, 0.0401],
            [0.026, 0.029582, 0.0335],
            [0.028, 0.031717, 0.0358],
            [0.0276, 0.031742, 0.0361],
            [0.0224, 0.026358, 0.0311],
            [0.0077, 0.008695, 0.0099],
            [0.0008, 0.001023, 0.0014],
            [0.0049, 0.008463, 0.0124],
            [0.0026, 0.005675, 0.0093],
            [0.0221, 0.026457, 0.0309],
        ],
    ),
];

/// `tests/data/expected.py`, line B (tifffile), bands B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12.
const BEN_V1_STATS: [[f64; 3]; 12] = [
    [0.0266, 0.03954, 0.0761],
    [0.0129, 0.037916, 0.2013],
    [0.0328, 0.079258, 0.237],
    [0.0159, 0.050538, 0.258],
    [0.0658, 0.139907, 0.267],
    [0.1751, 0.368975, 0.562],
    [0.183, 0.447659, 0.7532],
    [0.1491, 0.463023, 0.7525],
    [0.2027, 0.487957, 0.7767],
    [0.2962, 0.485138, 0.7419],
    [0.1189, 0.240169, 0.3694],
    [0.0533, 0.124946, 0.2856],
];

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("inspect --json prints one object per line"))
        .collect()
}

fn assert_stats(info: &serde_json::Value, expected: &[[f64; 3]]) {
    let bands = info["bands"].as_array().unwrap();
    assert_eq!(bands.len(), expected.len());
    for (b, e) in bands.iter().zip(expected) {
        let got = [b["min"].as_f64().unwrap(), b["mean"].as_f64().unwrap(), b["max"].as_f64().unwrap()];
        for (g, e) in got.iter().zip(e) {
            assert!((g - e).abs() < 2e-6, "{}: got {got:?}, tifffile {e:?}", b["name"]);
        }
    }
}

#[test]
fn inspect_statistics_match_tifffile_on_eurosat() {
    let paths: Vec<String> = EUROSAT_STATS.iter().map(|(n, _)| eurosat(n).display().to_string()).collect();
    let mut args = vec!["inspect", "--json", "--layout", "eurosat13"];
    args.extend(paths.iter().map(String::as_str));
    let out = run_in(&root(), &args);
    assert_ok(&out);
    let infos = json_lines(&out);
    for ((info, (_, expected)), epsg) in infos.iter().zip(&EUROSAT_STATS).zip(EUROSAT_EPSG) {
        assert_stats(info, expected);
        assert_eq!(info["bands"][12]["name"], "B8A");
        assert_eq!(info["data_type"], "u16");
        assert_eq!(info["interleave"], "chunky");
        assert_eq!(info["georef"]["epsg"], epsg, "{info}");
    }
}

#[test]
fn inspect_statistics_match_tifffile_on_a_bigearthnet_folder() {
    let out = run_in(&root(), &["inspect", "--json", data(BEN_V1).to_str().unwrap()]);
    assert_ok(&out);
    let info = &json_lines(&out)[0];
    assert_stats(info, &BEN_V1_STATS);
    assert_eq!(info["format"], "bigearthnet-v1");
    assert_eq!(info["labels"][0], "Pastures");
    assert_eq!(info["bands"][0]["width"], 20);
    // Original v1 files are GeoTIFFs; tifffile: EPSG 32629, pixel 10 m, tiepoint (604800, 5834040).
    assert_eq!(info["georef"]["epsg"], 32629, "{info}");
    assert_eq!(info["georef"]["origin"], serde_json::json!([604800.0, 5834040.0]));
}

#[test]
fn inspect_reports_a_bad_file_and_goes_on_with_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.tif"), b"not a tiff at all").unwrap();
    let good = eurosat(EUROSAT[0]);
    let out = run_in(dir.path(), &["inspect", "--layout", "eurosat13", "bad.tif", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.tif: not a TIFF file"), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("AnnualCrop_1.tif") && text.contains("B8A") && text.contains("EPSG:32635"),
        "{text}"
    );
}

#[test]
fn inspect_walks_folders_and_names_both_bigearthnet_versions() {
    let out = run_in(&root(), &["inspect", "--json", data("bigearthnet-s2").to_str().unwrap()]);
    assert_ok(&out);
    let formats: Vec<String> =
        json_lines(&out).iter().map(|i| i["format"].as_str().unwrap().to_string()).collect();
    assert_eq!(formats, ["bigearthnet-v2", "bigearthnet-v1"]);
}

/// Issue #12, item 14: `inspect` is where a user learns what a file holds, so a file the layout
/// cannot name is still described, its bands by index, with the layout that would name them.
#[test]
fn eurosat_without_layout_shows_bands_by_index_and_suggests_eurosat13() {
    let out = run_in(&root(), &["inspect", eurosat(EUROSAT[0]).to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("13 bands but layout `bigearthnet10` has 10") && text.contains("--layout eurosat13"),
        "{text}"
    );
    assert!(text.contains("\n  #1 ") && text.contains("\n  #13 "), "{text}");
    let json = run_in(&root(), &["inspect", "--json", eurosat(EUROSAT[0]).to_str().unwrap()]);
    let info = &json_lines(&json)[0];
    assert_eq!(info["bands"].as_array().unwrap().len(), 13);
    assert!(info["bands"][12]["mean"].as_f64().unwrap() > 0.0, "{info}");
}

// ---------------------------------------------------------------- patches from real data

#[test]
fn eurosat_tile_is_one_64_px_patch_with_the_seed_bands_picked_by_name() {
    let p = &patches(&eurosat(EUROSAT[1]), &eurosat_cfg()).unwrap()[0];
    let all = &patches(&eurosat(EUROSAT[1]), &all_bands_cfg()).unwrap()[0];
    assert_eq!((p.width, p.height, p.channels()), (64, 64, 10));
    assert_eq!(p.bands, dinostream::config::SEED_BANDS);
    // Seed channel 6 is B11 = file sample 10; channel 8 is B8A = file sample 12.
    assert_eq!(p.plane(6), all.plane(10));
    assert_eq!(p.plane(8), all.plane(12));
    assert_eq!(p.nodata_fraction, 0.0);
}

/// `tests/data/expected.py`, lines C and D: cv2.resize(float32 DN, (120, 120), INTER_CUBIC) / 10000 at (y, x).
const CV2_B05: [(usize, usize, f32); 6] = [
    (0, 0, 0.129449),
    (0, 1, 0.132316),
    (1, 1, 0.131214),
    (59, 60, 0.148313),
    (119, 119, 0.079119),
    (77, 3, 0.117218),
];
const CV2_B01: [(usize, usize, f32); 4] =
    [(0, 0, 0.067604), (2, 3, 0.068866), (60, 61, 0.036483), (119, 0, 0.040983)];

#[test]
fn bigearthnet_coarse_bands_are_resampled_like_opencv_inter_cubic() {
    let cfg = TileConfig { bands: vec!["B05".into(), "B01".into()], ..TileConfig::default() };
    let p = &patches(&data(BEN_V2), &cfg).unwrap()[0];
    assert_eq!((p.width, p.height), (120, 120));
    for (c, table) in [(0, &CV2_B05[..]), (1, &CV2_B01[..])] {
        for &(y, x, want) in table {
            let got = p.plane(c)[y * 120 + x];
            assert!((got - want).abs() < 1e-4, "{} ({y},{x}): {got} vs cv2 {want}", p.bands[c]);
        }
    }
}

#[test]
fn bigearthnet_v1_and_v2_folders_give_one_120_px_patch_and_their_labels() {
    for dir in [BEN_V1, BEN_V2] {
        let input = Input::detect(&data(dir)).unwrap();
        assert_eq!(input.kind, InputKind::BigEarthNet);
        let p = tile::read_patches(&input, &TileConfig::default()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].width, p[0].height, p[0].channels()), (120, 120, 10));
        assert!(!tile::labels(&input).is_empty());
    }
}

#[test]
fn listing_finds_tiles_and_folders_and_skips_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let ben = dir.path().join("ben").join("S2A_X_1_2");
    std::fs::create_dir_all(&ben).unwrap();
    for b in ["B02", "B03"] {
        std::fs::copy(
            data(BEN_V2).join(format!("{}_{b}.tif", BEN_V2.rsplit('/').next().unwrap())),
            ben.join(format!("S2A_X_1_2_{b}.tif")),
        )
        .unwrap();
    }
    for name in ["a.tif", ".hidden.tif", "b.tif.tmp", "c.tif.part", "notes.txt"] {
        std::fs::write(dir.path().join(name), b"x").unwrap();
    }
    let inputs = tile::list_inputs(dir.path()).unwrap();
    let names: Vec<_> =
        inputs.iter().map(|i| i.path.file_name().unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(names, ["a.tif", "S2A_X_1_2"]);
    assert_eq!(inputs[1].kind, InputKind::BigEarthNet);
}

#[test]
fn every_file_in_shared_data_ingests() {
    let Some(shared) = shared_data() else {
        eprintln!("skipped: ../shared/data is not present");
        return;
    };
    let mut total = 0;
    for (folder, cfg) in [("eurosat-ms", eurosat_cfg()), ("bigearthnet-s2", TileConfig::default())] {
        let inputs = tile::list_inputs(&shared.join(folder)).unwrap();
        assert!(inputs.len() > 70, "{folder}: {}", inputs.len());
        for input in &inputs {
            let got = tile::read_patches(input, &cfg).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len(), 1, "{}", input.path.display());
            tile::inspect(input, &cfg).unwrap_or_else(|e| panic!("{e}"));
        }
        total += inputs.len();
    }
    assert_eq!(total, 312 + 77);
}

// ---------------------------------------------------------------- layouts and codecs decode alike

/// The DN values of a real EuroSAT tile, `[band][y][x]`.
fn eurosat_dn() -> Vec<Vec<f64>> {
    let p = &patches(&eurosat(EUROSAT[2]), &all_bands_cfg()).unwrap()[0];
    (0..13).map(|c| p.plane(c).iter().map(|v| (v * 10000.0).round() as f64).collect()).collect()
}

fn write(dir: &Path, name: &str, spec: &TiffSpec, dn: &[Vec<f64>]) -> PathBuf {
    let w = spec.width as usize;
    let path = dir.join(name);
    std::fs::write(&path, tiff_bytes(spec, |b, y, x| dn[b][y * w + x])).unwrap();
    path
}

#[test]
fn chunky_planar_tiled_and_compressed_variants_decode_identically() {
    let dn = eurosat_dn();
    let dir = tempfile::tempdir().unwrap();
    let base = TiffSpec { width: 64, height: 64, bands: 13, rows_per_strip: 4, ..TiffSpec::default() };
    let reference = patches(&eurosat(EUROSAT[2]), &all_bands_cfg()).unwrap();
    let variants = [
        ("chunky-strips-none", TiffSpec { ..base.clone() }),
        (
            "planar-strips-deflate",
            TiffSpec { planar: true, codec: Codec::Deflate, rows_per_strip: 7, ..base.clone() },
        ),
        ("chunky-tiles-lzw", TiffSpec { tile: Some(16), codec: Codec::Lzw, ..base.clone() }),
        ("planar-tiles-zstd", TiffSpec { planar: true, tile: Some(32), codec: Codec::Zstd, ..base.clone() }),
        ("chunky-edge-tiles-deflate", TiffSpec { tile: Some(48), codec: Codec::Deflate, ..base.clone() }),
        ("i16-chunky-zstd", TiffSpec { sample: Sample::I16, codec: Codec::Zstd, ..base.clone() }),
        ("u32-planar-lzw", TiffSpec { sample: Sample::U32, planar: true, codec: Codec::Lzw, ..base.clone() }),
        ("f32-chunky-tiles", TiffSpec { sample: Sample::F32, tile: Some(32), ..base.clone() }),
        ("one-strip", TiffSpec { rows_per_strip: 64, codec: Codec::Deflate, ..base.clone() }),
    ];
    for (name, spec) in &variants {
        let path = write(dir.path(), &format!("{name}.tif"), spec, &dn);
        let got = patches(&path, &all_bands_cfg()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got[0].data, reference[0].data, "{name}");
    }
}

#[test]
fn u8_files_decode_to_their_values() {
    let dn: Vec<Vec<f64>> =
        eurosat_dn().into_iter().map(|b| b.iter().map(|v| (v / 20.0).min(255.0).floor()).collect()).collect();
    let dir = tempfile::tempdir().unwrap();
    let spec = TiffSpec {
        width: 64,
        height: 64,
        bands: 13,
        sample: Sample::U8,
        planar: true,
        ..TiffSpec::default()
    };
    let got = &patches(&write(dir.path(), "u8.tif", &spec, &dn), &all_bands_cfg()).unwrap()[0];
    for (c, band) in dn.iter().enumerate() {
        let want: Vec<f32> = band.iter().map(|v| *v as f32 / 10000.0).collect();
        assert_eq!(got.plane(c), &want[..]);
    }
}

#[test]
fn tiled_planar_file_with_partial_edge_tiles_decodes_or_fails_cleanly() {
    // image-tiff#403: the decoder may panic on this layout; ingest must not.
    let dn = eurosat_dn();
    let dir = tempfile::tempdir().unwrap();
    let spec = TiffSpec {
        width: 64,
        height: 64,
        bands: 13,
        planar: true,
        tile: Some(48),
        codec: Codec::Deflate,
        ..TiffSpec::default()
    };
    let reference = patches(&eurosat(EUROSAT[2]), &all_bands_cfg()).unwrap();
    match patches(&write(dir.path(), "edge.tif", &spec, &dn), &all_bands_cfg()) {
        Ok(got) => assert_eq!(got[0].data, reference[0].data),
        Err(e) => assert_eq!(e.kind(), "decoder_panic", "{e}"),
    }
}

#[test]
fn gdal_band_descriptions_win_over_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TiffSpec {
        bands: 3,
        descriptions: vec!["B04".into(), "B03".into(), "B02".into()],
        ..TiffSpec::default()
    };
    let path = dir.path().join("rgb.tif");
    std::fs::write(&path, tiff_bytes(&spec, |b, _, _| 1000.0 * (b + 1) as f64)).unwrap();
    let cfg = TileConfig { bands: vec!["B02".into(), "B03".into(), "B04".into()], ..TileConfig::default() };
    let p = &patches(&path, &cfg).unwrap()[0];
    assert_eq!([p.plane(0)[0], p.plane(1)[0], p.plane(2)[0]], [0.3, 0.2, 0.1]);
}

#[test]
fn nan_and_the_nodata_value_become_zero_and_count_as_nodata() {
    let dir = tempfile::tempdir().unwrap();
    let spec =
        TiffSpec { bands: 3, sample: Sample::F32, nodata: Some("-9999".into()), ..TiffSpec::default() };
    let path = dir.path().join("nd.tif");
    // Row 0: NaN in band 0; row 1: nodata in band 2; rows 2..8 valid.
    std::fs::write(
        &path,
        tiff_bytes(&spec, |b, y, _| match (b, y) {
            (0, 0) => f64::NAN,
            (2, 1) => -9999.0,
            _ => 500.0,
        }),
    )
    .unwrap();
    let cfg = TileConfig {
        layout: "B02,B03,B04".into(),
        bands: vec!["B02".into(), "B03".into(), "B04".into()],
        ..TileConfig::default()
    };
    let p = &patches(&path, &cfg).unwrap()[0];
    assert_eq!(p.nodata_fraction, 16.0 / 64.0);
    assert_eq!(p.plane(0)[0], 0.0);
    assert_eq!(p.plane(2)[8], 0.0);
    assert_eq!(p.plane(1)[0], 0.05);
}

#[test]
fn large_tiled_scene_is_cut_into_windows_that_match_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (300usize, 250usize);
    let value = |b: usize, y: usize, x: usize| ((b * 7 + y * 3 + x) % 5000 + 1) as f64;
    let spec = TiffSpec {
        width: w as u32,
        height: h as u32,
        bands: 10,
        tile: Some(64),
        codec: Codec::Deflate,
        ..TiffSpec::default()
    };
    let path = dir.path().join("scene.tif");
    std::fs::write(&path, tiff_bytes(&spec, value)).unwrap();
    let cfg = TileConfig { patch_px: 100, stride_px: 90, ..TileConfig::default() };
    let mut seen = Vec::new();
    let count = tile::for_each_patch(&Input::detect(&path).unwrap(), &cfg, |p| {
        let (x0, y0) = (p.window.x as usize, p.window.y as usize);
        // Channel 6 is B11, the file's 7th band of bigearthnet10 = sample 6.
        assert_eq!(p.plane(6)[3 * 100 + 5], value(6, y0 + 3, x0 + 5) as f32 / 10000.0);
        seen.push((x0, y0));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(seen, [(0, 0), (90, 0), (180, 0), (0, 90), (90, 90), (180, 90)]);
    assert_eq!(count.yielded, 6);
}

// ---------------------------------------------------------------- broken files

/// A valid 16x16 3-band u16 file to break.
fn small_spec() -> TiffSpec {
    TiffSpec { width: 16, height: 16, bands: 3, rows_per_strip: 4, ..TiffSpec::default() }
}

fn small_bytes(spec: &TiffSpec) -> Vec<u8> {
    tiff_bytes(spec, |b, y, x| (100 + b * 10 + y + x) as f64)
}

fn with(overrides: &[(u16, u32)]) -> Vec<u8> {
    small_bytes(&TiffSpec { overrides: overrides.to_vec(), ..small_spec() })
}

/// Declares a 30000 x 30000 px image stored as one strip (3.4 GB to inflate at once).
fn one_strip_scene() -> Vec<u8> {
    let spec = TiffSpec { rows_per_strip: 16, ..small_spec() };
    small_bytes(&TiffSpec { overrides: vec![(256, 30_000), (257, 30_000), (278, 30_000)], ..spec })
}

/// A deflate strip that inflates to far more than the strip declares.
fn bomb() -> Vec<u8> {
    let spec = TiffSpec { codec: Codec::Deflate, rows_per_strip: 16, ..small_spec() };
    let mut bytes = small_bytes(&spec);
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut e, &vec![0u8; 4 << 20]).unwrap();
    let strip = e.finish().unwrap();
    // Put the bomb at the end and point the strip there.
    let at = bytes.len() as u32;
    bytes.extend(&strip);
    patch_tag(&mut bytes, 273, at);
    patch_tag(&mut bytes, 279, strip.len() as u32);
    bytes
}

/// Rewrite the inline LONG/SHORT value of `tag` in the first IFD of a little-endian file.
pub(crate) fn patch_tag(bytes: &mut [u8], tag: u16, value: u32) {
    let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let n = u16::from_le_bytes([bytes[ifd], bytes[ifd + 1]]) as usize;
    for i in 0..n {
        let e = ifd + 2 + 12 * i;
        if u16::from_le_bytes([bytes[e], bytes[e + 1]]) == tag {
            let ty = u16::from_le_bytes([bytes[e + 2], bytes[e + 3]]);
            let v = if ty == 3 { (value as u16 as u32).to_le_bytes() } else { value.to_le_bytes() };
            bytes[e + 8..e + 12].copy_from_slice(&v);
        }
    }
}

/// Corrupt the payload of every strip (keeps headers intact).
fn garbage_deflate() -> Vec<u8> {
    let mut bytes = small_bytes(&TiffSpec { codec: Codec::Deflate, ..small_spec() });
    for b in &mut bytes[10..40] {
        *b = 0xA5;
    }
    bytes
}

fn three_band_cfg() -> TileConfig {
    TileConfig {
        layout: "B02,B03,B04".into(),
        bands: vec!["B02".into(), "B03".into(), "B04".into()],
        ..TileConfig::default()
    }
}

/// Make a BigEarthNet folder from the bundled v2 one, with `edit` applied to the band files.
fn broken_folder(root: &Path, name: &str, edit: impl Fn(&str, &mut Vec<u8>) -> bool) -> PathBuf {
    let dir = root.join(format!("S2A_MSIL2A_20170613T101031_{name}_1_2"));
    std::fs::create_dir_all(&dir).unwrap();
    for (band, path) in std::fs::read_dir(data(BEN_V2)).unwrap().flatten().map(|e| e.path()).filter_map(|p| {
        let n = p.file_name()?.to_str()?.to_string();
        Some((n.strip_suffix(".tif")?.rsplit('_').next()?.to_string(), p))
    }) {
        let mut bytes = std::fs::read(&path).unwrap();
        if edit(&band, &mut bytes) {
            std::fs::write(dir.join(format!("x_{band}.tif")), bytes).unwrap();
        }
    }
    dir
}

#[test]
fn broken_corpus_each_file_gives_its_own_error_and_nothing_panics() {
    let dir = tempfile::tempdir().unwrap();
    let valid = small_bytes(&small_spec());
    let half = valid.len() / 2;
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.tif", vec![], "empty"),
        ("text.tif", b"hello, this is not an image".to_vec(), "not_tiff"),
        ("png.tif", b"\x89PNG\r\n\x1a\n0000000000000000".to_vec(), "not_tiff"),
        ("jpeg.tif", vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F'], "not_tiff"),
        ("three-bytes.tif", b"II*".to_vec(), "truncated"),
        ("header-only.tif", b"II*\0\x08\0\0\0".to_vec(), "truncated"),
        ("ifd-beyond-eof.tif", b"II*\0\xff\xff\0\0\0\0\0\0".to_vec(), "truncated"),
        ("cut-in-strips.tif", valid[..half.min(200)].to_vec(), "truncated"),
        ("cut-in-ifd.tif", valid[..valid.len() - 30].to_vec(), "truncated"),
        ("bits-12.tif", with(&[(258, 12)]), "unsupported"),
        ("float16.tif", with(&[(339, 3)]), "unsupported"),
        ("void-samples.tif", with(&[(339, 4)]), "unsupported"),
        ("jpeg-compressed.tif", with(&[(259, 7)]), "unsupported"),
        ("unknown-compression.tif", with(&[(259, 12345)]), "unsupported"),
        ("wide.tif", with(&[(256, 50_000)]), "too_large"),
        ("tall.tif", with(&[(257, 50_000)]), "too_large"),
        ("20-bands.tif", with(&[(277, 20)]), "too_large"),
        ("scene-in-one-strip.tif", one_strip_scene(), "too_large"),
        ("zero-width.tif", with(&[(256, 0)]), "corrupt"),
        ("garbage-deflate.tif", garbage_deflate(), "corrupt"),
        ("bomb.tif", bomb(), "decompression_bomb"),
        ("five-bands.tif", small_bytes(&TiffSpec { bands: 5, ..small_spec() }), "band_count"),
    ];
    let mut seen = Vec::new();
    for (name, bytes, kind) in &files {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = patches(&path, &three_band_cfg()).expect_err(name);
        assert_eq!(err.kind(), *kind, "{name}: {err}");
        assert_eq!(err.path(), path);
        assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
        seen.push(err.to_string());
    }
    // The same file, read with a layout that lacks a configured band.
    let lacking = dir.path().join("lacking.tif");
    std::fs::write(&lacking, &valid).unwrap();
    let cfg = TileConfig { layout: "B02,B03,B08".into(), ..three_band_cfg() };
    let err = patches(&lacking, &cfg).unwrap_err();
    assert_eq!(err.kind(), "missing_band", "{err}");
    assert!(err.to_string().contains("missing band B04"), "{err}");
    // Gone between listing and reading.
    let gone = Input { path: dir.path().join("gone.tif"), kind: InputKind::Stacked };
    assert_eq!(tile::read_patches(&gone, &three_band_cfg()).unwrap_err().kind(), "vanished");
    assert!(files.len() + 2 >= 20);
}

#[test]
fn broken_bigearthnet_folders_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = broken_folder(dir.path(), "missing", |band, _| band != "B12");
    let err = patches(&missing, &TileConfig::default()).unwrap_err();
    assert_eq!(err.kind(), "missing_band", "{err}");
    assert!(err.to_string().contains("missing band B12"), "{err}");

    let odd = broken_folder(dir.path(), "odd", |band, bytes| {
        if band == "B05" {
            *bytes = tiff_bytes(
                &TiffSpec { width: 50, height: 50, rows_per_strip: 50, ..TiffSpec::default() },
                |_, _, _| 1.0,
            );
        }
        true
    });
    let err = patches(&odd, &TileConfig::default()).unwrap_err();
    assert_eq!(err.kind(), "band_sizes", "{err}");
    assert!(err.path().ends_with("x_B05.tif"), "{err}");

    let cut = broken_folder(dir.path(), "cut", |band, bytes| {
        if band == "B03" {
            bytes.truncate(5000);
        }
        true
    });
    assert_eq!(patches(&cut, &TileConfig::default()).unwrap_err().kind(), "truncated");

    let empty = dir.path().join("plain-folder");
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(Input::detect(&empty).unwrap_err().kind(), "not_input");
}

// ---------------------------------------------------------------- memory on a full scene

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Slow (writes and reads a 2.9 GB-raw scene): `cargo test --release --test integration full_sentinel2 -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_sentinel2_scene_is_cut_into_patches_in_under_1_gb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("T33UUP.tif");
    let side = 10_980u32;
    // The left tenth is nodata (zeros); the rest a blocky pattern.
    let value = |b: usize, y: usize, x: usize| {
        if x < 1098 { 0.0 } else { (1000 + (x / 37 + y / 53 + b * 5) % 200) as f64 }
    };
    let spec = TiffSpec {
        width: side,
        height: side,
        bands: 12,
        tile: Some(512),
        codec: Codec::Deflate,
        ..TiffSpec::default()
    };
    let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    crate::tiff_writer::write_tiff(file, &spec, value).unwrap();
    let before = peak_rss_bytes();
    let cfg = TileConfig { layout: "sentinel2-12".into(), ..TileConfig::default() };
    let started = std::time::Instant::now();
    let mut checked = 0usize;
    let count = tile::for_each_patch(&Input::detect(&path).unwrap(), &cfg, |p| {
        if checked < 50 {
            let (x0, y0) = (p.window.x as usize, p.window.y as usize);
            assert_eq!(p.plane(0)[7 * 120 + 9], value(1, y0 + 7, x0 + 9) as f32 / 10000.0);
            checked += 1;
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    let peak = peak_rss_bytes();
    eprintln!(
        "scene {side}x{side}x12 u16 deflate, {} bytes on disk: {} patches, {} skipped, {:.1} s, VmHWM before cutting {} MB, after {} MB",
        std::fs::metadata(&path).unwrap().len(),
        count.yielded,
        count.skipped,
        started.elapsed().as_secs_f64(),
        before >> 20,
        peak >> 20
    );
    assert_eq!(count.yielded + count.skipped, 91 * 91);
    assert_eq!(count.skipped, 91 * 9);
    assert!(peak < 1 << 30, "peak RSS {} MB", peak >> 20);
}

#[test]
fn configured_nodata_value_applies_when_the_file_declares_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u16.tif");
    std::fs::write(
        &path,
        tiff_bytes(
            &TiffSpec { bands: 3, ..TiffSpec::default() },
            |_, y, _| if y < 4 { 65535.0 } else { 900.0 },
        ),
    )
    .unwrap();
    let without = &patches(&path, &three_band_cfg()).unwrap()[0];
    assert_eq!(without.nodata_fraction, 0.0);
    let cfg = TileConfig { nodata: Some(65535.0), ..three_band_cfg() };
    let with = &patches(&path, &cfg).unwrap()[0];
    assert_eq!(with.nodata_fraction, 0.5);
    assert_eq!(with.plane(0)[0], 0.0);
}

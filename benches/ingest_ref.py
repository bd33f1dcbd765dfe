"""Reference for benches/ingest.rs: the same work with tifffile (+ OpenCV for BigEarthNet), single thread.

EuroSAT: read the 64x64x13 tile, pick the seed's 10 bands by index, to float32 [C,H,W] / 10000.
BigEarthNet: read the 10 band files of a folder, cv2.resize INTER_CUBIC the 60 px ones to 120, stack, / 10000.
Usage: python benches/ingest_ref.py [DATA_DIR]
"""
import glob, os, sys, time
import numpy as np, tifffile, cv2

cv2.setNumThreads(1)
PASSES = 5
SEED = ["B02", "B03", "B04", "B05", "B06", "B07", "B11", "B08", "B8A", "B12"]
EUROSAT13 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
EUROSAT_IDX = [EUROSAT13.index(b) for b in SEED]

def eurosat(path):
    img = tifffile.imread(path)  # H, W, 13
    return np.ascontiguousarray(img[..., EUROSAT_IDX].transpose(2, 0, 1)).astype(np.float32) / 10000.0

def bigearthnet(folder):
    name = os.path.basename(folder)
    planes = []
    for b in SEED:
        a = tifffile.imread(f"{folder}/{name}_{b}.tif").astype(np.float32)
        if a.shape[0] != 120:
            a = cv2.resize(a, (120, 120), interpolation=cv2.INTER_CUBIC)
        planes.append(a)
    return np.stack(planes) / 10000.0

def cpu_secs():
    """CPU time of this process from /proc/self/schedstat, as the Rust bench measures it."""
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0]) / 1e9

def best_pass(items, fn):
    best, best_cpu = float("inf"), float("inf")
    for _ in range(PASSES):
        t, c = time.perf_counter(), cpu_secs()
        for it in items:
            fn(it)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, cpu_secs() - c)
    return best, best_cpu

data = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../shared/data")
tiles = sorted(glob.glob(f"{data}/eurosat-ms/*/*.tif"))
folders = sorted(d for d in glob.glob(f"{data}/bigearthnet-s2/S2*") if os.path.isdir(d))
for name, items, fn in [("eurosat-ms", tiles, eurosat), ("bigearthnet-s2", folders, bigearthnet)]:
    wall, cpu = best_pass(items, fn)
    n = len(items)
    print(f"python {name}: {n} patches, best of {PASSES} passes: wall {wall:.4f} s = {n / wall:.0f} patches/s, cpu {cpu:.4f} s = {n / cpu:.0f} patches/s")

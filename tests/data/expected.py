"""Expected numbers for tests/ingest.rs, computed independently of dinostream with tifffile and OpenCV.

Run once: /work/venvs/ingest/bin/python tests/data/expected.py  (numpy, tifffile, opencv-python-headless).
Prints (1) per-band min/mean/max reflectance (DN / 10000) of each bundled input, in file band order, and
(2) cv2.resize INTER_CUBIC of a BigEarthNet 20 m band (float32 DN input) at a few pixels, in reflectance.
"""
import glob, os
import numpy as np, tifffile, cv2

HERE = os.path.dirname(os.path.abspath(__file__))

def stats(a):
    a = a.astype(np.float64) / 10000.0
    return [round(float(a.min()), 6), round(float(a.mean()), 6), round(float(a.max()), 6)]

for f in sorted(glob.glob(f"{HERE}/eurosat-ms/*/*.tif")):
    img = tifffile.imread(f)  # (64, 64, 13)
    print(os.path.relpath(f, HERE), [stats(img[..., b]) for b in range(img.shape[-1])])  # line A

for d in sorted(glob.glob(f"{HERE}/bigearthnet-s2/S2*")):
    bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    print(os.path.basename(d), [stats(tifffile.imread(glob.glob(f"{d}/*_{b}.tif")[0])) for b in bands])  # line B

d = sorted(glob.glob(f"{HERE}/bigearthnet-s2/S2*"))[0]
b05 = tifffile.imread(glob.glob(f"{d}/*_B05.tif")[0]).astype(np.float32)
up = cv2.resize(b05, (120, 120), interpolation=cv2.INTER_CUBIC) / 10000.0
print(os.path.basename(d), "B05 cubic", [[y, x, round(float(up[y, x]), 6)] for y, x in [(0, 0), (0, 1), (1, 1), (59, 60), (119, 119), (77, 3)]])  # line C
b01 = tifffile.imread(glob.glob(f"{d}/*_B01.tif")[0]).astype(np.float32)
up = cv2.resize(b01, (120, 120), interpolation=cv2.INTER_CUBIC) / 10000.0
print(os.path.basename(d), "B01 cubic", [[y, x, round(float(up[y, x]), 6)] for y, x in [(0, 0), (2, 3), (60, 61), (119, 0)]])  # line D

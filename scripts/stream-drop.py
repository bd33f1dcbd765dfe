#!/usr/bin/env python3
"""Drop tiles into a folder `dinostream serve` watches, in a chosen order and at a chosen rate, as a
satellite downlink delivers them (used by `scripts/learning-eval.sh --stream`).

Tiles: the EuroSAT-MS files named in BANK_CSV (the bank part of the group split) and, with
--bigearthnet, the BigEarthNet-S2 patch folders under DATA/bigearthnet-s2. Orders:
  shuffled  one seeded shuffle of all tiles
  class     grouped by class label (EuroSAT label; BigEarthNet folders form one group), the groups
            and the tiles inside each in seeded random order
  scene     grouped by `spatial_group` (BigEarthNet: the scene name), likewise
Each drop is copied to a dot-name ending in .part (which the service ignores) and renamed into
place, so the service only ever sees complete tiles. Every drop is logged to --log as CSV
(seconds since the start, name, label, group). Stops when every tile is dropped.

  stream-drop.py DATA BANK_CSV WATCH_DIR --order class --seed 0 --rate 60 --log drops.csv
"""
import argparse
import csv
import os
import random
import shutil
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder with eurosat-ms/ (labels.csv) and optionally bigearthnet-s2/")
    ap.add_argument("bank_csv", help="filename,label rows of the tiles to drop (the bank split)")
    ap.add_argument("watch", help="the folder serve watches")
    ap.add_argument("--order", choices=["shuffled", "class", "scene"], default="shuffled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", default="60", help="tiles per minute, or `burst` for all at once")
    ap.add_argument("--bigearthnet", action="store_true", help="drop the BigEarthNet-S2 folders too")
    ap.add_argument("--log", required=True, help="CSV of the drops")
    args = ap.parse_args()
    interval = 0.0 if args.rate == "burst" else 60.0 / positive_rate(args.rate)
    tiles = order(list_tiles(args), args.order, random.Random(args.seed))
    print(f"dropping {len(tiles)} tiles, order {args.order} (seed {args.seed}), "
          f"rate {args.rate}{'' if args.rate == 'burst' else ' per minute'}", flush=True)
    drop_all(tiles, args.watch, interval, args.log)


def positive_rate(text):
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if rate <= 0:
        sys.exit(f"--rate {text}: give tiles per minute (> 0) or `burst`")
    return rate


def list_tiles(args):
    """(source path, dropped name, label, group) of every tile to drop."""
    eurosat = os.path.join(args.data, "eurosat-ms")
    with open(os.path.join(eurosat, "labels.csv")) as f:
        groups = {r["filename"]: r["spatial_group"] for r in csv.DictReader(f)}
    with open(args.bank_csv) as f:
        tiles = [(os.path.join(eurosat, r["filename"]), os.path.basename(r["filename"]), r["label"],
                  "eurosat-" + groups[r["filename"]]) for r in csv.DictReader(f)]
    if args.bigearthnet:
        ben = os.path.join(args.data, "bigearthnet-s2")
        for name in sorted(os.listdir(ben)):
            if os.path.isdir(os.path.join(ben, name)):
                scene = "_".join(name.split("_")[:-2])
                tiles.append((os.path.join(ben, name), name, "bigearthnet", "bigearthnet-" + scene))
    return tiles


def order(tiles, how, rng):
    tiles = sorted(tiles, key=lambda t: t[1])
    rng.shuffle(tiles)
    if how == "shuffled":
        return tiles
    key = 2 if how == "class" else 3
    names = sorted({t[key] for t in tiles})
    rng.shuffle(names)
    rank = {name: i for i, name in enumerate(names)}
    return sorted(tiles, key=lambda t: rank[t[key]])  # stable: the shuffle holds inside a group


def drop_all(tiles, watch, interval, log_path):
    start = time.monotonic()
    with open(log_path, "w", newline="") as log:
        out = csv.writer(log)
        out.writerow(["seconds", "name", "label", "group"])
        for i, (src, name, label, group) in enumerate(tiles):
            time.sleep(max(0.0, start + i * interval - time.monotonic()))
            drop(src, watch, name)
            out.writerow([f"{time.monotonic() - start:.1f}", name, label, group])
            log.flush()
    print(f"dropped all {len(tiles)} tiles in {time.monotonic() - start:.0f} s", flush=True)


def drop(src, watch, name):
    """Copy to `.NAME.part` (ignored by the service), then rename: the service sees it complete."""
    part = os.path.join(watch, f".{name}.part")
    if os.path.isdir(src):
        shutil.copytree(src, part)
    else:
        shutil.copyfile(src, part)
    os.rename(part, os.path.join(watch, name))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The PyTorch reference trainer (`ref_train.py` of the reference folder) with a model preset to
choose: `micro` (vit-micro-p8, what ref_train.py trains as shipped) or `tiny` (vit-tiny-p8:
ViT-Tiny/8 with the 65536-way DINO head, models/vit-tiny-p8.toml). Everything else (data, recipe,
schedules, augmentation inline on the training thread) is ref_train.py's own.

  python benches/ref_train_preset.py --preset tiny [--ref DIR] train --steps 20 --batch 8 --threads 2 --out OUT

`--ref` (default ../shared/reference) is where ref_train.py, dino_ref.py and augment_ref.py live.
"""
import argparse
import os
import sys

# models/*.toml, in ref_train.MICRO's keys
PRESETS = {
    "micro": dict(arch="golden", out_dim=256, hidden_dim=64, bottleneck_dim=32, nlayers=3, img=120, patch=8),
    "tiny": dict(arch="tiny", out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3, img=120, patch=8),
}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--ref", default=os.path.join(here, "..", "..", "shared", "reference"))
    args, rest = ap.parse_known_args()
    sys.path.insert(0, os.path.abspath(args.ref))
    import ref_train

    if ref_train.MICRO != PRESETS["micro"]:
        sys.exit(f"ref_train.py's model is not vit-micro-p8 any more ({ref_train.MICRO}): update PRESETS here")
    ref_train.MICRO.update(PRESETS[args.preset])
    sys.argv = [os.path.join(args.ref, "ref_train.py")] + rest
    ref_train.main()


if __name__ == "__main__":
    main()

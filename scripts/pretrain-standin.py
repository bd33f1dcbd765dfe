#!/usr/bin/env python3
"""A stand-in for public pretrained weights (which cannot be downloaded here): a vit-micro-p8-sized
ViT/8 (the reference ViT of shared/reference/dino_ref.py: embed 48, depth 2, 3 heads, 10 bands, 120 px)
trained *supervised* with PyTorch on the EuroSAT-MS labels of the bank part of the group split
(every 5th `spatial_group` is query, the rest bank: scripts/learning-eval.sh, ref_train.py
`make_splits`), saved in DINO's training-checkpoint format for `dinostream train/serve --init`.

  OUT/standin_dino.pth                {"student": {"module.backbone.*"}, "teacher": {"backbone.*"},
                                       "epoch", "args"} as facebookresearch/dino main_dino.py saves
  OUT/standin_backbone.safetensors    the same backbone as a plain state dict, for ref_train.py eval
                                      (`--model standin=torch:OUT/standin_backbone.safetensors`)

Inputs are prepared as dinostream's evaluation prepares them: reflectance (DN / 10000) in the
seed's band order B02 B03 B04 B05 B06 B07 B11 B08 B8A B12 (`bigearthnet10`), bilinearly resized
64 -> 120 px, normalised with the seed's per-band statistics. Training adds flips and 90 degree
rotations. Minutes on a CPU:

  ~/.venvs/dino-ref/bin/python scripts/pretrain-standin.py --out standin --epochs 30
  dinostream train --data ../shared/data/eurosat-ms --layout eurosat13 --steps 0 --model vit-micro-p8 \
      --init standin/standin_dino.pth --init-bands B02,B03,B04,B05,B06,B07,B11,B08,B8A,B12 --checkpoint standin/ckpt
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.path.join(ROOT, "..", "shared", "reference"),
                    help="folder with dino_ref.py, augment_ref.py and ref_train.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, args.reference)
    import augment_ref as A
    import dino_ref as D
    import ref_train as R

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    splits, classes = R.make_splits(["dev"])
    split = splits["dev"]
    mean, std = A.norm_stats("band")
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    x = torch.from_numpy(np.stack([R.resize_bilinear_120(i, R.MICRO["img"]) for i in split["bank"]]))
    x = (x - mean) / std
    y = torch.from_numpy(split["yb"]).long()
    print(f"bank: {len(y)} tiles, {len(classes)} classes; query {len(split['yq'])} tiles (not used)", flush=True)

    backbone = D.make_vit(R.MICRO["arch"], R.MICRO["img"], R.MICRO["patch"], drop_path_rate=0.1)
    classifier = nn.Linear(backbone.embed_dim, len(classes))
    model = nn.Sequential(backbone, classifier)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(y) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        total, correct = 0.0, 0
        for i in range(0, len(y), args.batch):
            idx = order[i:i + args.batch]
            xb = augment(x[idx], g)
            logits = model(xb)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(y):.3f}, train acc {correct / len(y):.3f}, "
              f"{time.time() - start:.0f} s", flush=True)

    backbone.eval()
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    os.makedirs(args.out, exist_ok=True)
    checkpoint = {
        "student": {f"module.backbone.{k}": v for k, v in state.items()},
        "teacher": {f"backbone.{k}": v for k, v in state.items()},
        "epoch": args.epochs,
        "args": argparse.Namespace(arch="vit_micro", patch_size=8, supervised_standin=True, seed=args.seed),
    }
    torch.save(checkpoint, os.path.join(args.out, "standin_dino.pth"))
    from safetensors.torch import save_file
    save_file(state, os.path.join(args.out, "standin_backbone.safetensors"))
    print(f"wrote {args.out}/standin_dino.pth and standin_backbone.safetensors", flush=True)


def augment(xb, g):
    """Random horizontal/vertical flips and 90 degree rotations, per batch."""
    if torch.rand(1, generator=g).item() < 0.5:
        xb = xb.flip(3)
    if torch.rand(1, generator=g).item() < 0.5:
        xb = xb.flip(2)
    return torch.rot90(xb, int(torch.randint(0, 4, (1,), generator=g).item()), dims=(2, 3))


if __name__ == "__main__":
    main()

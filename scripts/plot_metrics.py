#!/usr/bin/env python3
"""Plot a training run from `dinostream train --metrics FILE` (JSON lines, one per step).

Three panels over the steps: the DINO loss (and learning rate), the teacher entropy / ln K with
KL(teacher || student), and the std of the l2-normalised teacher cls embedding against 1/sqrt(d)
(the value for features spread over the sphere; a collapsed teacher goes to 0).

    python3 scripts/plot_metrics.py metrics.jsonl curve.png [--title TEXT]

Needs matplotlib (`pip install matplotlib`).
"""
import argparse
import json
import sys


def load(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"{path}: no steps in the metrics file")
    return rows


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics")
    ap.add_argument("out")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(args.metrics)
    fig, (ax_loss, ax_ent, ax_std) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(*series(rows, "loss"), color="tab:blue", lw=1)
    ax_loss.set_ylabel("DINO loss")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(*series(rows, "lr"), color="tab:gray", lw=1, ls="--")
    ax_lr.set_ylabel("learning rate", color="tab:gray")

    ax_ent.plot(*series(rows, "teacher_entropy_ratio"), "o-", ms=3, label="teacher entropy / ln K")
    ax_ent.set_ylim(0, 1.05)
    ax_ent.set_ylabel("entropy / ln K")
    ax_kl = ax_ent.twinx()
    ax_kl.plot(*series(rows, "kl_teacher_student"), "s-", ms=3, color="tab:red", label="KL(teacher || student)")
    ax_kl.set_ylabel("KL (nats)", color="tab:red")
    ax_ent.legend(loc="upper left", fontsize=8)
    ax_kl.legend(loc="upper right", fontsize=8)

    steps, std = series(rows, "teacher_cls_std")
    ax_std.plot(steps, std, "o-", ms=3, label="std of normalised teacher cls")
    _, uniform = series(rows, "uniform_cls_std")
    if uniform:
        ax_std.axhline(uniform[0], color="k", ls=":", label="1/sqrt(d)")
    ax_std.set_ylabel("cls std")
    ax_std.set_xlabel("step")
    ax_std.legend(fontsize=8)
    last = rows[-1]
    fig.suptitle(args.title or f"{len(rows)} steps, {last.get('elapsed_s', 0):.0f} s, final loss {last['loss']:.3f}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"{args.out}: {len(rows)} steps")


if __name__ == "__main__":
    main()

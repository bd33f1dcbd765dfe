#!/usr/bin/env python3
"""PyTorch's own bf16 deviation on the golden training steps: the yardstick for dinostream's
`precision = "bf16"` tolerance (tests/dino.rs, `bf16_training_steps_...`).

Runs the two golden steps of `dino_ref.py golden` (same weights, crops, settings: tests/golden/)
with `train_step(..., amp_dtype=torch.bfloat16)` (torch.autocast on the CPU) and prints, per step,
how far the result is from the f32 golden files, in the metrics the Rust test prints:
loss difference, centre max abs diff, parameter max abs diff, and the relative error of the
parameter update ||d_bf16 - d_f32|| / ||d_f32|| over all student tensors.

    python3 benches/bf16_reference.py [--reference ../shared/reference]
Needs torch, numpy and safetensors (the reference's own requirements).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default=os.path.join(ROOT, "..", "shared", "reference"))
    args = ap.parse_args()
    sys.path.insert(0, args.reference)
    import torch
    from safetensors.torch import load_file

    import dino_ref as R

    golden = os.path.join(ROOT, "tests", "golden")
    index = json.load(open(os.path.join(golden, "index.json")))
    head_kw = dict(hidden_dim=64, bottleneck_dim=32)
    student = R.MultiCropWrapper(R.make_vit("golden"), R.DINOHead(48, 128, **head_kw))
    student.backbone.load_state_dict(load_file(os.path.join(golden, "vit_weights.safetensors")))
    student.head.load_state_dict(load_file(os.path.join(golden, "head_weights.safetensors")))
    teacher = R.MultiCropWrapper(R.make_vit("golden"), R.DINOHead(48, 128, **head_kw))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    x120 = load_file(os.path.join(golden, "vit_io.safetensors"))["x120"]
    glob = [x120, x120.transpose(2, 3).contiguous()]
    offsets = index["training"]["local_offsets"]
    crops = glob + [glob[v][:, :, y:y + 56, x:x + 56].contiguous() for v, y, x in offsets]
    dino_loss = R.DINOLoss(128, 8, 0.04, 0.07, 30, 100)
    opt = torch.optim.AdamW(R.get_params_groups(student))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    print(json.dumps({"raw_gradient_rel_err_step1": raw_gradient_error(R, student, teacher, dino_loss, crops,
                                                                       load_file(os.path.join(golden, "step1.safetensors")))}))
    for i, meta in enumerate(index["training"]["steps"]):
        want = load_file(os.path.join(golden, meta["file"]))
        loss, _, _ = R.train_step(student, teacher, dino_loss, opt, crops, meta["epoch"], meta["lr"],
                                  meta["weight_decay"], meta["momentum"], meta["clip"], 1, torch.bfloat16)
        params, num, den = 0.0, 0.0, 0.0
        for side, model in (("student", student), ("teacher", teacher)):
            for k, v in model.state_dict().items():
                ref = want[f"{side}.{k}"]
                params = max(params, float((v - ref).abs().max()))
                if side == "student":
                    num += float(((v - ref) ** 2).sum())
                    den += float(((ref - before[k]) ** 2).sum())
        center = float((dino_loss.center - want["center_after"]).abs().max())
        print(json.dumps({"step": i + 1, "torch": torch.__version__, "loss_bf16": float(loss),
                          "loss_f32": float(want["loss"]), "center_max_abs_diff": center,
                          "params_max_abs_diff": params, "update_rel_err": (num / den) ** 0.5}))


def raw_gradient_error(R, student, teacher, dino_loss, crops, want):
    """||g_bf16 - g_f32|| / ||g_f32|| of the first step's raw gradients, all student tensors (the
    numerics of one forward + backward pass, before Adam amplifies tiny differences)."""
    import torch

    center = dino_loss.center.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss(student(crops), teacher(crops[:2]), 0)
    loss.backward()
    dino_loss.center.copy_(center)
    num = den = 0.0
    for k, p in student.named_parameters():
        if p.grad is not None:
            ref = want[f"grad.{k}"]
            num += float(((p.grad - ref) ** 2).sum())
            den += float((ref ** 2).sum())
            p.grad = None
    return (num / den) ** 0.5


if __name__ == "__main__":
    main()

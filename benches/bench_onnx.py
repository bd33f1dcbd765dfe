"""Embeddings/s on CPU in ONNX Runtime: the ViT teacher backbone exported by dinostream vs the same
weights exported by PyTorch (`torch.onnx.export`, opset 17, as `dino_ref.py bench-onnx` does).

Not a test: numbers go to BENCHMARKS.md. Needs torch, onnxruntime and numpy, the dinostream binary
and the reference (`shared/reference/dino_ref.py`). Random weights from `torch.manual_seed(0)`; both
graphs get the same weights and the same input, batch 32, 120 px, 10 bands, and run in one
onnxruntime with the same session options, alternating per repetition so load drift hits both.

    python benches/bench_onnx.py --dinostream target/release/dinostream \
        --reference ../shared/reference --arch tiny,small --threads 0,1
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

BANDS = "B02,B03,B04,B05,B06,B07,B11,B08,B8A,B12"


def save_safetensors(path, tensors, metadata):
    """Minimal safetensors writer (float32 only), so the `safetensors` package is not needed."""
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    for name, t in tensors.items():
        data = np.ascontiguousarray(t, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


ARCHS = {"tiny": (192, 12, 3), "small": (384, 12, 6)}


def random_state_dict(arch):
    """DINO backbone names and shapes with random weights (numpy, seed 0), for runs without torch."""
    d, depth, _ = ARCHS[arch]
    rng = np.random.default_rng(0)
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 226, d), "patch_embed.proj.weight": (d, 10, 8, 8),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        p = f"blocks.{i}"
        shapes.update({f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,), f"{p}.attn.qkv.weight": (3 * d, d),
                       f"{p}.attn.qkv.bias": (3 * d,), f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
                       f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,), f"{p}.mlp.fc1.weight": (4 * d, d),
                       f"{p}.mlp.fc1.bias": (4 * d,), f"{p}.mlp.fc2.weight": (d, 4 * d), f"{p}.mlp.fc2.bias": (d,)})
    return {k: (rng.standard_normal(s) * 0.02 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)).astype("f4")
            for k, s in shapes.items()}


def export_ours(arch, sd, binary, work):
    d, depth, heads = ARCHS[arch]
    preset = (f'name = "vit-{arch}-p8"\npatch_size = 8\nembed_dim = {d}\ndepth = {depth}\n'
              f'num_heads = {heads}\nlayernorm_eps = 1e-6\nimg_size = 120\n')
    ckpt = os.path.join(work, arch)
    os.makedirs(ckpt, exist_ok=True)
    sd = {f"teacher.backbone.{k}": v for k, v in sd.items()}
    save_safetensors(os.path.join(ckpt, "model.safetensors"), sd, {"preset": preset, "bands": BANDS, "step": "0"})
    ours = os.path.join(work, f"{arch}-dinostream.onnx")
    subprocess.run([binary, "export", "--checkpoint", ckpt, "--out", ours, "--input-contract", "normalized"], check=True)
    return ours


def export_both(dino_ref, torch, arch, binary, work):
    torch.manual_seed(0)
    model = dino_ref.make_vit(arch, 120, 8, attn_impl="manual").eval()
    ours = export_ours(arch, {k: v.detach().numpy() for k, v in model.state_dict().items()}, binary, work)
    theirs = os.path.join(work, f"{arch}-torch.onnx")
    x = torch.randn(32, 10, 120, 120)
    torch.onnx.export(model, (x,), theirs, opset_version=17, input_names=["x"], output_names=["emb"],
                      dynamic_axes={"x": {0: "batch"}, "emb": {0: "batch"}}, dynamo=False)
    with torch.no_grad():
        ref = model(x).numpy()
    return {"dinostream": ours, "torch": theirs}, x.numpy(), ref


def bench(ort, paths, x, ref, threads, seconds):
    sessions = {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        out = sess.run(None, feed)[0]
        sessions[name] = (sess, feed, float(np.abs(out - ref).max()))
    spent = {name: 0.0 for name in paths}
    runs = {name: 0 for name in paths}
    t_end = time.perf_counter() + seconds * len(paths)
    while time.perf_counter() < t_end or min(runs.values()) < 3:
        for name, (sess, feed, _) in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            spent[name] += time.perf_counter() - t0
            runs[name] += 1
    return {name: {"embeddings_per_s": round(x.shape[0] * runs[name] / spent[name], 1),
                   "ms_per_batch": round(1000 * spent[name] / runs[name], 2), "runs": runs[name],
                   "max_abs_diff_vs_torch_eager": sessions[name][2]} for name in paths}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dinostream", required=True)
    ap.add_argument("--reference", required=True, help="folder holding dino_ref.py")
    ap.add_argument("--arch", default="tiny,small")
    ap.add_argument("--threads", default="0", help="comma list of intra-op threads (0 = all cores)")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    sys.path.insert(0, args.reference)
    import onnxruntime as ort
    try:
        import dino_ref
        import torch
    except ImportError as e:
        print(f"no torch ({e}): timing the dinostream export only, PyTorch side skipped", file=sys.stderr)
        torch = None
    with tempfile.TemporaryDirectory() as work:
        for arch in args.arch.split(","):
            if torch is None:
                sd = random_state_dict(arch)
                paths = {"dinostream": export_ours(arch, sd, args.dinostream, work)}
                x = np.random.default_rng(1).standard_normal((32, 10, 120, 120)).astype("f4")
                ref = ort.InferenceSession(paths["dinostream"], providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
            else:
                paths, x, ref = export_both(dino_ref, torch, arch, args.dinostream, work)
            for th in [int(t) for t in args.threads.split(",")]:
                res = bench(ort, paths, x, ref, th, args.seconds)
                print(json.dumps({"arch": arch, "batch": 32, "img": 120, "intra_op_threads": th,
                                  "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
                                  "torch": torch.__version__ if torch else None, **res}), flush=True)


if __name__ == "__main__":
    main()

"""Compares two latents files written by `denoised run` (tensor `latents`).
Usage: compare_latents.py REF.safetensors GOT.safetensors [--max-rel-l2 1e-2] [--label NAME]
                          [--base START.safetensors]
       compare_latents.py --make-noise C,F,H,W --seed S --out START.safetensors [--name TENSOR]
Prints max |diff| and relative L2 (||got-ref|| / ||ref||); exits 1 above the bound.
With --base, compares (base - ref) with (base - got): after one Euler step from
`base` with guidance 1 that is sigma_0 * v, i.e. the model's forward output alone.
Uses only numpy and the safetensors format (8-byte header length + JSON + data)."""
import argparse, json, struct, sys
import numpy as np


def load(path, name="latents"):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header[name]
    a, b = meta["data_offsets"]
    assert meta["dtype"] == "F32", meta["dtype"]
    return np.frombuffer(data[a:b], dtype="<f4").reshape(meta["shape"]).astype(np.float64)


def save(path, x, name="latents"):
    data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps({name: {"dtype": "F32", "shape": list(x.shape), "data_offsets": [0, len(data)]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)


if "--make-noise" in sys.argv:
    q = argparse.ArgumentParser()
    q.add_argument("--make-noise"); q.add_argument("--seed", type=int, default=0); q.add_argument("--out")
    q.add_argument("--name", default="latents")
    b = q.parse_args()
    shape = [int(v) for v in b.make_noise.split(",")]
    save(b.out, np.random.default_rng(b.seed).standard_normal(shape), b.name)
    sys.exit(0)

p = argparse.ArgumentParser()
p.add_argument("ref"); p.add_argument("got")
p.add_argument("--base", default="")
p.add_argument("--max-rel-l2", type=float, default=1e-2)
p.add_argument("--label", default="")
a = p.parse_args()
r, g = load(a.ref), load(a.got)
if a.base:
    base = load(a.base)
    r, g = base - r, base - g
if r.shape != g.shape:
    print(f"{a.label}: shape mismatch {r.shape} vs {g.shape}"); sys.exit(1)
rel = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
mx = float(np.max(np.abs(g - r)))
ok = np.isfinite(g).all() and rel <= a.max_rel_l2
print(f"{a.label}: shape {list(r.shape)} max|diff| {mx:.3e} rel L2 {rel:.3e} (bound {a.max_rel_l2:g}) {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)

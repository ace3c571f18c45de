#!/usr/bin/env python3
"""Trains "denoised-demo": a small Wan2.1 DiT (WanTransformer3DModel, diffusers layout) in pixel space.

What it does (see tools/README.md):
  * procedural clips: 8 frames x 32 x 32 RGB in [-1, 1], black background, one coloured shape
    (square / circle / triangle, 7..11 px) moving at a constant 2 or 3 px per frame left / right /
    up / down, staying inside the frame;
  * a prompt table: one fixed, seeded random vector per vocabulary word ("<colour> <shape> moving
    <direction>"), like the output of a frozen text encoder; prompt = the words' vectors in order,
    zero-padded to T = 4 rows; the empty prompt (all zeros) is the unconditional embedding;
  * our own PyTorch implementation of the Wan2.1 transformer, written from
    ../shared/docs/wan-spec.md (not copied from diffusers), with parameter names equal to the
    diffusers state dict, so the export is a plain state_dict dump;
  * flow-matching training (x_s = (1 - s) x0 + s noise, target v = noise - x0, timestep = 1000 s,
    s = shift_3(u), u ~ U(0, 1) -- the distribution the shift-3 samplers visit), 10 % unconditional,
    AdamW + warmup + cosine, bf16 autocast on CUDA, EMA of the weights (exported in f32);
  * a built-in eval: UniPC (the C++ engine's default sampler, re-implemented here), CFG, shift, and
    an analyser that reads dominant colour, shape and motion direction back from the clip;
  * the parity fixture for tools/check_demo_parity.py (C++ engine vs this model, no torch needed).

Outputs, all in --out (7 files): config.json, diffusion_pytorch_model.safetensors, prompts.safetensors,
parity.safetensors, TRAINING.md, train_log.txt, eval.json.

Runs on torch 1.13 (CPU) and torch 2.x (CUDA). Needs only torch and numpy.
GPU command (one H100, ~5 min):  python3 tools/train_demo_model.py --device cuda --out OUT_DIR
"""

import argparse
import contextlib
import json
import math
import os
import platform
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------- vocabulary
# Colours as RGB in [-1, 1] (far apart; background is black = -1).
COLOURS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ["square", "circle", "triangle"]
# (dx, dy) per frame, image rows grow downwards: "up" = decreasing row index.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VERB = "moving"
GRAMMAR = "<colour> <shape> moving <direction>"
TOKENS = 4  # T: rows of a prompt embedding
VOCAB = list(COLOURS) + SHAPES + [VERB] + list(DIRECTIONS)

FRAMES, SIZE = 8, 32
SIDE_MIN, SIDE_MAX = 7, 11  # shape size in pixels (side + 7 frames x 3 px <= 32)
# Pixels per frame. At least one 2x2 patch per frame: with 1 px/frame the first GPU run
# (4258 steps) learned the motion axis but not its sign (direction right on 19/48 evals).
SPEEDS = (2, 3)

# Model config (the contract's; config.json is what C++ reads).
CONFIG = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 32,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 512,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 3,
    "num_attention_heads": 4,
    "num_layers": 4,
    "out_channels": 3,
    "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 64,
    "vae_stride": [1, 1, 1],
}

# Recommended sampling settings (for the C++ engine and the built-in eval).
SAMPLE_STEPS, SAMPLE_GUIDANCE, SAMPLE_SHIFT = 20, 5.0, 3.0
TRAIN_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


# ------------------------------------------------------------------------------------ safetensors
_DT = {"F32": np.float32, "F64": np.float64, "I64": np.int64}


def save_safetensors(path, tensors, metadata=None):
    """{name: array-like} -> safetensors (F32 unless the array is int64/float64 by intent: all F32 here)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
        data = a.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    """-> ({name: np.ndarray}, metadata dict). F32/F64/I64 only (what this script writes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=np.dtype(_DT[info["dtype"]]).newbyteorder("<")).reshape(
            info["shape"]).copy()
    return out, meta


# ------------------------------------------------------------------------------------ prompt table
def make_prompt_table(seed, text_dim):
    """One fixed random vector per word (seeded): entries ~ N(0, 1), each vector rescaled to norm
    sqrt(text_dim) (RMS 1, i.e. O(1) inputs to the text embedder)."""
    g = torch.Generator().manual_seed(seed + 7919)
    table = {}
    for w in VOCAB:  # fixed order -> fixed vectors
        v = torch.randn(text_dim, generator=g, dtype=torch.float64)
        table[w] = (v / v.norm() * math.sqrt(text_dim)).float()
    return table


def tokenize(prompt, table, tokens=TOKENS):
    """The contract's tokenisation: lower-case, split on whitespace, every word in the table, at most
    T words, vectors in order, zero rows to T. '' -> T zero rows (unconditional)."""
    words = prompt.lower().split()
    if len(words) > tokens:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than T = {tokens}")
    text_dim = next(iter(table.values())).numel()
    e = torch.zeros(tokens, text_dim)
    for i, w in enumerate(words):
        if w not in table:
            raise ValueError(f"unknown word {w!r}; vocabulary: {' '.join(VOCAB)}")
        e[i] = table[w]
    return e


def prompt_of(c, s, d):
    return f"{list(COLOURS)[c]} {SHAPES[s]} {VERB} {list(DIRECTIONS)[d]}"


# ----------------------------------------------------------------------------------------- clips
def make_clips(n, gen, device, frames=FRAMES, size=SIZE):
    """Random clips [n, 3, F, H, W] in [-1, 1] and their labels (colour, shape, direction) [n] each.
    All randomness from `gen` (a torch.Generator on `device`)."""
    def ri(lo, hi):  # integers in [lo, hi) shape [n]
        return torch.randint(lo, hi, (n,), generator=gen, device=device)

    col, shp, drn = ri(0, len(COLOURS)), ri(0, len(SHAPES)), ri(0, len(DIRECTIONS))
    # 8..14 px at 32 x 32 (the shipped size); scaled for --debug-size runs.
    side = ri(SIDE_MIN * size // SIZE, SIDE_MAX * size // SIZE + 1)
    speed = torch.tensor(SPEEDS, device=device)[ri(0, len(SPEEDS))]
    dirs = torch.tensor(list(DIRECTIONS.values()), device=device)
    dx, dy = dirs[drn, 0], dirs[drn, 1]
    travel = speed * (frames - 1)
    # Start positions such that the whole trajectory stays inside the frame.
    def start(d):
        lo = torch.where(d < 0, travel, torch.zeros_like(travel))
        hi = size - side - torch.where(d > 0, travel, torch.zeros_like(travel))
        u = torch.rand(n, generator=gen, device=device)
        return lo + torch.minimum(torch.floor(u * (hi - lo + 1).float()).long(), hi - lo)
    x0, y0 = start(dx), start(dy)
    f = torch.arange(frames, device=device)
    px = (x0[:, None] + dx[:, None] * speed[:, None] * f[None]).float()  # [n, F] left column
    py = (y0[:, None] + dy[:, None] * speed[:, None] * f[None]).float()  # [n, F] top row
    coords = torch.arange(size, device=device, dtype=torch.float32)
    u = coords[None, None, None, :] - px[:, :, None, None]  # [n, F, 1, W] column inside the box
    v = coords[None, None, :, None] - py[:, :, None, None]  # [n, F, H, 1] row inside the box
    s = side.float()[:, None, None, None]
    c = (s - 1) / 2
    inside = (u >= 0) & (u < s) & (v >= 0) & (v < s)
    square = inside
    circle = inside & ((u - c) ** 2 + (v - c) ** 2 <= (s / 2) ** 2)
    triangle = inside & ((u - c).abs() <= (v + 1) / 2)  # apex at the top, base at the bottom
    k = shp[:, None, None, None]
    mask = torch.where(k == 0, square, torch.where(k == 1, circle, triangle))  # [n, F, H, W]
    rgb = torch.tensor(list(COLOURS.values()), device=device)[col]  # [n, 3]
    clip = torch.where(mask[:, None], rgb[:, :, None, None, None], torch.full_like(rgb[:, :, None, None, None], -1.0))
    return clip, col, shp, drn


# -------------------------------------------------------------------------------------- analyser
def analyse_clip(clip):
    """clip [3, F, H, W] in [-1, 1] -> dict(colour, shape, direction, ...) or colour=None when no
    foreground. Foreground = pixels whose brightest channel is > 0. Colour: nearest vocabulary colour
    to the mean foreground RGB. Shape: per-frame fill ratio of the foreground in its bounding box
    (square ~1, circle ~0.79, triangle ~0.55), median over frames. Direction: largest component of the
    foreground centroid's displacement from the first to the last frame."""
    clip = np.asarray(clip, dtype=np.float64)
    fg = clip.max(axis=0) > 0.0  # [F, H, W]
    out = {"colour": None, "shape": None, "direction": None}
    if fg.sum() < 4:
        return out
    mean_rgb = clip[:, fg].mean(axis=1)
    names = list(COLOURS)
    out["colour"] = names[int(np.argmin([np.sum((mean_rgb - np.array(COLOURS[n])) ** 2) for n in names]))]
    fills, cents = [], []
    for f in range(clip.shape[1]):
        ys, xs = np.nonzero(fg[f])
        if len(ys) < 4:
            cents.append(None)
            continue
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
        cents.append((xs.mean(), ys.mean()))
    if fills:
        fill = float(np.median(fills))
        out["fill"] = round(fill, 3)
        out["shape"] = "square" if fill > 0.9 else ("circle" if fill > 0.67 else "triangle")
    cs = [c for c in cents if c is not None]
    if len(cs) >= 2:
        ddx, ddy = cs[-1][0] - cs[0][0], cs[-1][1] - cs[0][1]
        out["motion_px"] = (round(float(ddx), 2), round(float(ddy), 2))
        if max(abs(ddx), abs(ddy)) >= 2.0:
            if abs(ddx) >= abs(ddy):
                out["direction"] = "right" if ddx > 0 else "left"
            else:
                out["direction"] = "down" if ddy > 0 else "up"
    return out


# ------------------------------------------------------------------------------------------ model
def _linear(i, o):
    return nn.Linear(i, o, bias=True)


def up(x):
    """Norm / modulation / RoPE math precision: float32 (float64 when the model runs in float64)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNormAcrossHeads(nn.Module):
    """y = x / sqrt(mean(x^2 over all D) + eps) * weight (spec §3.6; weight [D])."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = up(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * up(self.weight)).to(x.dtype)


class Attention(nn.Module):
    """attn1 (self, with RoPE) / attn2 (cross): to_q/to_k/to_v/to_out.0 + norm_q/norm_k."""

    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = _linear(dim, dim), _linear(dim, dim), _linear(dim, dim)
        self.to_out = nn.ModuleList([_linear(dim, dim)])
        self.norm_q = RMSNormAcrossHeads(dim, eps)
        self.norm_k = RMSNormAcrossHeads(dim, eps)

    def forward(self, x, ctx=None, rope=None):
        kv = x if ctx is None else ctx
        b, lq, d = x.shape
        lk = kv.shape[1]
        h = self.heads
        q = self.norm_q(self.to_q(x)).view(b, lq, h, d // h)
        k = self.norm_k(self.to_k(kv)).view(b, lk, h, d // h)
        v = self.to_v(kv).view(b, lk, h, d // h)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, l, dh]
        a = attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, lq, d)
        return self.to_out[0](a)


def attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v)
    # torch < 2.0: explicit softmax attention.
    w = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(w.softmax(-1), v)


def rope_tables(head_dim, grid, theta=10000.0, device="cpu", dtype=torch.float32):
    """(cos, sin) [L, head_dim/2] for the 3-axis RoPE of spec §3.7: channels split
    t = d - 4*(d//6), h = w = 2*(d//6); axis ladder theta^(-2j/dim_axis); built in float64."""
    ft, fh, fw = grid
    dh_ = 2 * (head_dim // 6)
    dt_ = head_dim - 2 * dh_
    angles = []
    for n_pos, dim_a, axis in ((ft, dt_, 0), (fh, dh_, 1), (fw, dh_, 2)):
        j = torch.arange(dim_a // 2, dtype=torch.float64)
        omega = theta ** (-2.0 * j / dim_a)
        pos = torch.arange(n_pos, dtype=torch.float64)
        ang = pos[:, None] * omega[None]  # [n, dim_a/2]
        shape = [ft, fh, fw, dim_a // 2]
        view = [1, 1, 1, dim_a // 2]
        view[axis] = n_pos
        angles.append(ang.view(view).expand(shape))
    phi = torch.cat(angles, dim=-1).reshape(ft * fh * fw, head_dim // 2)
    return torch.cos(phi).to(device=device, dtype=dtype), torch.sin(phi).to(device=device, dtype=dtype)


def apply_rope(x, rope):
    """x [b, L, h, d]; pairs (2k, 2k+1) rotated by phi_k (GPT-J / interleaved style), math in f32."""
    cos, sin = rope
    xf = up(x).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return y.reshape(x.shape).to(x.dtype)


class GELUProj(nn.Module):
    """ffn.net.0: Linear + tanh-approximated GELU (diffusers' GELU(approximate='tanh') module)."""

    def __init__(self, i, o):
        super().__init__()
        self.proj = _linear(i, o)

    def forward(self, x):
        return gelu_tanh(self.proj(x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class FeedForward(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, ffn_dim), nn.Identity(), _linear(ffn_dim, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


def layer_norm(x, eps, weight=None, bias=None):
    return F.layer_norm(up(x), (x.shape[-1],), None if weight is None else up(weight),
                        None if bias is None else up(bias), eps)


class Block(nn.Module):
    def __init__(self, dim, heads, ffn_dim, eps):
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.attn1 = Attention(dim, heads, eps)
        self.attn2 = Attention(dim, heads, eps)
        # diffusers names: norm2 = the affine LN before cross-attn (original Wan2.1's norm3);
        # norm1 / norm3 are parameter-less (functional layer_norm below).
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x, ctx, tproj, rope):
        # x: f32 (f64) residual stream [b, L, D]; tproj [b, 6, D]. Linears run in the autocast dtype.
        e = up(self.scale_shift_table) + up(tproj)
        shift1, scale1, gate1, shift2, scale2, gate2 = (e[:, i:i + 1] for i in range(6))
        h = layer_norm(x, self.eps) * (1 + scale1) + shift1
        x = x + up(self.attn1(h, rope=rope)) * gate1
        h2 = layer_norm(x, self.eps, self.norm2.weight, self.norm2.bias)
        x = x + up(self.attn2(h2, ctx=ctx))
        h3 = layer_norm(x, self.eps) * (1 + scale2) + shift2
        x = x + up(self.ffn(h3)) * gate2
        return x


class TimeEmbedder(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.linear_1, self.linear_2 = _linear(i, o), _linear(o, o)

    def forward(self, s):
        return self.linear_2(F.silu(self.linear_1(s)))


class TextEmbedder(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.linear_1, self.linear_2 = _linear(i, o), _linear(o, o)

    def forward(self, c):
        return self.linear_2(gelu_tanh(self.linear_1(c)))


class ConditionEmbedder(nn.Module):
    def __init__(self, dim, freq_dim, text_dim):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimeEmbedder(freq_dim, dim)
        self.time_proj = _linear(dim, 6 * dim)
        self.text_embedder = TextEmbedder(text_dim, dim)


def timestep_sinusoid(t, freq_dim, dtype=torch.float32):
    """Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [cos(t w_j), sin(t w_j)],
    w_j = exp(-ln(10000) j / half), j < half = freq_dim/2. Computed in float64, returned as dtype."""
    half = freq_dim // 2
    j = torch.arange(half, dtype=torch.float64, device=t.device)
    w = torch.exp(-math.log(10000.0) * j / half)
    a = t.double()[:, None] * w[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1).to(dtype)


class WanModel(nn.Module):
    """WanTransformer3DModel (T2V), parameter names = diffusers state dict names."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.dim, self.heads, self.eps = d, cfg["num_attention_heads"], cfg["eps"]
        self.patch = tuple(cfg["patch_size"])
        self.out_channels = cfg["out_channels"]
        self.patch_embedding = nn.Conv3d(cfg["in_channels"], d, kernel_size=self.patch, stride=self.patch)
        self.condition_embedder = ConditionEmbedder(d, cfg["freq_dim"], cfg["text_dim"])
        self.blocks = nn.ModuleList(
            [Block(d, self.heads, cfg["ffn_dim"], self.eps) for _ in range(cfg["num_layers"])])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d ** 0.5)
        self.proj_out = _linear(d, self.out_channels * int(np.prod(self.patch)))
        self._rope_cache = {}
        self.init_weights()

    def init_weights(self):
        # Like Wan2.1's init: xavier-uniform linears, zero biases, N(0, 0.02) embedders. The head is
        # NOT zero-initialised (so even an untrained export gives a non-trivial parity check).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        ce = self.condition_embedder
        for m in (ce.text_embedder.linear_1, ce.text_embedder.linear_2,
                  ce.time_embedder.linear_1, ce.time_embedder.linear_2):
            nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.proj_out.weight, std=0.02)

    def rope(self, grid, device, dtype):
        key = (grid, str(device), dtype)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.dim // self.heads, grid, device=device, dtype=dtype)
        return self._rope_cache[key]

    def forward(self, x, t, ctx):
        """x [B, C_in, F, H, W], t [B] (float timesteps = 1000 sigma), ctx [B, T, text_dim]
        -> v [B, C_out, F, H, W] (float32; float64 for a float64 model)."""
        adt = torch.float64 if self.proj_out.weight.dtype == torch.float64 else torch.float32
        b, _, f, hh, ww = x.shape
        pt, ph, pw = self.patch
        grid = (f // pt, hh // ph, ww // pw)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, L, D], L frame-major
        ce = self.condition_embedder
        s = timestep_sinusoid(t, ce.freq_dim, adt)
        temb = ce.time_embedder(s)                                           # [B, D]
        tproj = ce.time_proj(F.silu(temb)).view(b, 6, self.dim)              # [B, 6, D]
        ctx = ce.text_embedder(ctx)                                          # [B, T, D]
        rope = self.rope(grid, x.device, adt)
        xs = up(tokens)
        for blk in self.blocks:
            xs = blk(xs, ctx, tproj, rope)
        ss = up(self.scale_shift_table) + up(temb)[:, None, :]
        shift, scale = ss[:, 0:1], ss[:, 1:2]
        y = layer_norm(xs, self.eps) * (1 + scale) + shift
        y = up(self.proj_out(y))                                             # [B, L, C·pt·ph·pw]
        ft, fh, fw = grid
        c = self.out_channels
        y = y.view(b, ft, fh, fw, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, c, ft * pt, fh * ph, fw * pw)


def expected_names(cfg):
    top = ["patch_embedding.weight", "patch_embedding.bias"]
    for m in ("time_embedder.linear_1", "time_embedder.linear_2", "time_proj",
              "text_embedder.linear_1", "text_embedder.linear_2"):
        top += [f"condition_embedder.{m}.weight", f"condition_embedder.{m}.bias"]
    top += ["scale_shift_table", "proj_out.weight", "proj_out.bias"]
    blk = ["scale_shift_table", "norm2.weight", "norm2.bias", "ffn.net.0.proj.weight", "ffn.net.0.proj.bias",
           "ffn.net.2.weight", "ffn.net.2.bias"]
    for a in ("attn1", "attn2"):
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            blk += [f"{a}.{p}.weight", f"{a}.{p}.bias"]
        blk += [f"{a}.norm_q.weight", f"{a}.norm_k.weight"]
    return set(top) | {f"blocks.{i}.{n}" for i in range(cfg["num_layers"]) for n in blk}


# --------------------------------------------------------------------------------------- samplers
def shift_sigma(u, shift):
    return shift * u / (1.0 + (shift - 1.0) * u)


def unipc_schedule(steps, shift):
    """As worker/sampler.cc (diffusers UniPC, use_flow_sigmas): sigmas float32-stored, timesteps
    truncated from the float64 sigmas, sigma_0 nudged below 1, final sigma 0."""
    step = (1.0 / NUM_TRAIN_TIMESTEPS - 1.0) / steps
    grid = [shift_sigma(i * step + 1.0, shift) for i in range(steps)]
    if abs(grid[0] - 1.0) < 1e-6:
        grid[0] -= 1e-6
    timesteps = [float(int(g * NUM_TRAIN_TIMESTEPS)) for g in grid]
    sigmas = [float(np.float32(g)) for g in grid] + [0.0]
    return sigmas, timesteps


def euler_schedule(steps, shift):
    """As worker/sampler.cc (diffusers FlowMatchEulerDiscreteScheduler(shift)): float32 arithmetic."""
    sf, sm1 = np.float32(shift), np.float32(shift - 1.0)

    def shift_f32(u):
        u = np.float32(u)
        return np.float32(sf * u) / np.float32(np.float32(1.0) + np.float32(sm1 * u))
    smax, smin = float(shift_f32(1.0)), float(shift_f32(np.float32(1.0) / np.float32(1000.0)))
    t0, t1 = smax * NUM_TRAIN_TIMESTEPS, smin * NUM_TRAIN_TIMESTEPS
    sigmas, timesteps = [], []
    for i in range(steps):
        if steps == 1:
            t = t0
        elif i == steps - 1:
            t = t1
        else:
            t = i * ((t1 - t0) / (steps - 1)) + t0
        sg = np.float32(shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift))
        sigmas.append(float(sg))
        timesteps.append(float(np.float32(sg * np.float32(1000.0))))
    return sigmas + [0.0], timesteps


def _lam(s):
    return math.log(1.0 - s) - math.log(s)


@torch.no_grad()
def sample(model, x, cond, uncond, steps, guidance, shift, scheduler="unipc", model_dtype=None):
    """Sampling loop of the C++ engine: per step v = v_u + g (v_c - v_u) (CFG iff g > 1), then the
    scheduler update. x [B, C, F, H, W] f32 (initial noise), cond/uncond [B, T, text_dim].
    UniPC-bh2 exactly as worker/sampler.cc; Euler x += (s_{i+1} - s_i) v."""
    if scheduler == "unipc":
        sigmas, timesteps = unipc_schedule(steps, shift)
    else:
        sigmas, timesteps = euler_schedule(steps, shift)
    x = x.clone().float()  # the sample is stored in float32 between steps, as in the engine
    b = x.shape[0]
    mdt = model_dtype or torch.float32
    cfg_on = guidance > 1.0
    m1 = m2 = last = None
    prev_order = 0
    for i in range(steps):
        t = torch.full((b,), timesteps[i], device=x.device, dtype=torch.float64)
        if cfg_on:
            v2 = model(torch.cat([x, x]).to(mdt), torch.cat([t, t]), torch.cat([cond, uncond]).to(mdt)).double()
            vc, vu = v2[:b], v2[b:]
            v = vu + guidance * (vc - vu)
        else:
            v = model(x.to(mdt), t, cond.to(mdt)).double()
        if scheduler != "unipc":
            x = (x + float(np.float32(sigmas[i + 1]) - np.float32(sigmas[i])) * v.float()).float()
            continue
        s = sigmas[i]
        m = (x.double() - s * v.double()).float()
        if i > 0:
            sp = sigmas[i - 1]
            alpha = 1.0 - s
            h = _lam(s) - _lam(sp)
            phi = math.expm1(-h)
            ratio = s / sp
            c_m1 = alpha * phi
            rho0, rho1, inv_r = 0.0, 0.5, 0.0
            if prev_order == 2:
                r = (_lam(sigmas[i - 2]) - _lam(sp)) / h
                g1 = phi / (-h) - 1.0
                g2 = g1 / (-h) - 0.5
                b0, b1 = g1 / phi, 2.0 * g2 / phi
                rho0 = (b0 - b1) / (1.0 - r)
                rho1 = b0 - rho0
                inv_r = 1.0 / r
            res = rho1 * (m.double() - m1.double())
            if prev_order == 2:
                res = res + rho0 * ((m2.double() - m1.double()) * inv_r)
            x = (ratio * last.double() - c_m1 * m1.double() - c_m1 * res).float()
        m2, m1 = m1, m
        order = min(2, steps - i, i + 1)
        last = x.clone()
        sn = sigmas[i + 1]
        if sn == 0.0:
            x = m1.clone()
        else:
            an = 1.0 - sn
            h = _lam(sn) - _lam(s)
            phi = math.expm1(-h)
            nxt = (sn / s) * x.double() - an * phi * m1.double()
            if order == 2:
                inv_r = h / (_lam(sigmas[i - 1]) - _lam(s))
                nxt = nxt - an * phi * 0.5 * ((m2.double() - m1.double()) * inv_r)
            x = nxt.float()
        prev_order = order
    return x


# ------------------------------------------------------------------------------------------- main
def bf16_autocast(enabled):
    """bf16 autocast on CUDA, or nothing (torch 1.13 CPU builds cannot even construct a disabled one)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def log(msg, fh=None):
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


def eval_prompts(n):
    """n distinct prompts cycling colours, shapes and directions (lcm 60 -> all distinct for n <= 60)."""
    return [(i % len(COLOURS), i % len(SHAPES), i % len(DIRECTIONS)) for i in range(n)]


def run_eval(model, table, device, n_prompts, seeds, steps, guidance, shift, dtype, fh, frames=FRAMES, size=SIZE):
    prompts = eval_prompts(n_prompts)
    results = []
    cond = torch.stack([tokenize(prompt_of(*p), table) for p in prompts]).to(device)
    uncond = torch.zeros_like(cond)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((len(prompts), 3, frames, size, size), generator=g).to(device)
        with bf16_autocast(dtype == "bf16"):
            out = sample(model, x, cond, uncond, steps, guidance, shift, "unipc")
        out = out.clamp(-1, 1).cpu().numpy()
        for k, p in enumerate(prompts):
            a = analyse_clip(out[k])
            want = (list(COLOURS)[p[0]], SHAPES[p[1]], list(DIRECTIONS)[p[2]])
            ok = (a["colour"] == want[0], a["shape"] == want[1], a["direction"] == want[2])
            results.append({"prompt": prompt_of(*p), "seed": seed, "got": [a["colour"], a["shape"], a["direction"]],
                            "fill": a.get("fill"), "motion_px": a.get("motion_px"),
                            "colour_ok": ok[0], "shape_ok": ok[1], "direction_ok": ok[2]})
    tot = len(results)
    summ = {k: sum(r[k + "_ok"] for r in results) for k in ("colour", "shape", "direction")}
    summ["all"] = sum(r["colour_ok"] and r["shape_ok"] and r["direction_ok"] for r in results)
    summ["total"] = tot
    for r in results:
        flag = "OK " if (r["colour_ok"] and r["shape_ok"] and r["direction_ok"]) else "BAD"
        log(f"  eval {flag} seed {r['seed']:>3} '{r['prompt']}' -> {r['got']} fill {r['fill']} motion {r['motion_px']}", fh)
    log(f"eval (UniPC {steps} steps, CFG {guidance}, shift {shift}): colour {summ['colour']}/{tot}, "
        f"shape {summ['shape']}/{tot}, direction {summ['direction']}/{tot}, all three {summ['all']}/{tot}", fh)
    return summ, results


def make_parity(model_cpu, table, seed):
    """Fixture for tools/check_demo_parity.py, computed in float64 on the CPU from the exported f32
    weights (the exact tensors written to diffusion_pytorch_model.safetensors)."""
    m = model_cpu.double()
    g = torch.Generator().manual_seed(seed + 4242)
    prompt = "red circle moving right"
    x = torch.randn((1, 3, FRAMES, SIZE, SIZE), generator=g).float()
    cond = tokenize(prompt, table)[None]
    uncond = torch.zeros_like(cond)
    with torch.no_grad():
        t = torch.full((2,), 1000.0, dtype=torch.float64)
        v = m(torch.cat([x, x]).double(), t, torch.cat([cond, uncond]).double())
        euler = sample(m, x, cond, uncond, 3, SAMPLE_GUIDANCE, SAMPLE_SHIFT, "euler", torch.float64)
        unipc = sample(m, x, cond, uncond, 4, SAMPLE_GUIDANCE, SAMPLE_SHIFT, "unipc", torch.float64)
    model_cpu.float()
    tensors = {"latents": x[0], "prompt_embeds": cond[0], "negative_embeds": uncond[0],
               "v_cond": v[0], "v_uncond": v[1], "euler_out": euler[0], "unipc_out": unipc[0]}
    meta = {"prompt": prompt, "forward_timestep": "1000",
            "euler": f"steps 3 guidance {SAMPLE_GUIDANCE} shift {SAMPLE_SHIFT}",
            "unipc": f"steps 4 guidance {SAMPLE_GUIDANCE} shift {SAMPLE_SHIFT}",
            "computed": "PyTorch float64 on CPU from the exported f32 weights"}
    return tensors, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model"))
    ap.add_argument("--steps", type=int, default=20000, help="optimiser steps (upper bound: --time-budget-s usually lowers it)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-budget-s", type=float, default=270.0,
                    help="if > 0: after --calibrate steps, lower --steps so training fits this many seconds; "
                         "the steps actually used are logged (pass them as --steps with --time-budget-s 0 to "
                         "replay the same schedule)")
    ap.add_argument("--calibrate", type=int, default=40, help="steps timed for --time-budget-s")
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--eval-seeds", default="1,2")
    ap.add_argument("--eval-steps", type=int, default=SAMPLE_STEPS)
    ap.add_argument("--layers", type=int, default=CONFIG["num_layers"])
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--compile", type=int, default=1,
                    help="1: train through torch.compile on CUDA (falls back to eager if it fails); 0: eager")
    ap.add_argument("--debug-size", default="", help="FRAMES,SIZE: train/eval on smaller clips (CPU "
                    "experiments only; the shipped model is trained at 8,32)")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "train_log.txt"), "w")
    cmd = "python3 tools/train_demo_model.py " + " ".join(sys.argv[1:])
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    card = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine()) + " CPU"
    log(f"command: {cmd}", fh)
    log(f"torch {torch.__version__}, device {dev} ({card}), seed {args.seed}", fh)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = dict(CONFIG)
    cfg["num_layers"] = args.layers
    table = make_prompt_table(args.seed, cfg["text_dim"])
    model = WanModel(cfg).to(dev)
    names = set(model.state_dict().keys())
    want = expected_names(cfg)
    if names != want:
        raise SystemExit(f"state dict names differ from the diffusers layout: extra {sorted(names - want)[:5]}, "
                         f"missing {sorted(want - names)[:5]}")
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg['num_layers']} layers, dim {model.dim}, {model.heads} heads, ffn {cfg['ffn_dim']}, "
        f"text_dim {cfg['text_dim']}: {nparams} parameters, {len(names)} tensors", fh)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    ema_names = list(ema)
    ema_list = [ema[k] for k in ema_names]
    live = dict(model.named_parameters())
    live_list = [live[k] for k in ema_names]  # every state-dict entry is a parameter (no buffers)
    frames, size = FRAMES, SIZE
    if args.debug_size:
        frames, size = (int(v) for v in args.debug_size.split(","))
        log(f"DEBUG: clips {frames} x {size} x {size} (not the shipped size)", fh)
    decay_params = [p for n, p in model.named_parameters() if p.dim() >= 2 and "scale_shift_table" not in n]
    other_params = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "scale_shift_table" not in n)]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01},
                             {"params": other_params, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    table_t = torch.stack([table[w] for w in VOCAB]).to(dev)  # [V, text_dim]
    colour_ids = torch.tensor([VOCAB.index(c) for c in COLOURS], device=dev)
    shape_ids = torch.tensor([VOCAB.index(s) for s in SHAPES], device=dev)
    dir_ids = torch.tensor([VOCAB.index(d) for d in DIRECTIONS], device=dev)
    verb_id = VOCAB.index(VERB)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)

    fwd = model
    if cuda and args.compile and hasattr(torch, "compile"):
        fwd = torch.compile(model)
        log("training forward through torch.compile (eval and export use the eager model)", fh)
    total = args.steps
    t_start = time.time()
    t_cal = None
    losses = []
    step = 0
    while step < total:
        # LR: linear warmup, cosine to 5 % of the peak.
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            p = (step - args.warmup) / max(1, total - args.warmup)
            lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x0, col, shp, drn = make_clips(args.batch, gen, dev, frames, size)
        ids = torch.stack([colour_ids[col], shape_ids[shp], torch.full_like(col, verb_id), dir_ids[drn]], 1)
        ctx = table_t[ids]  # [B, 4, text_dim]
        drop = torch.rand(args.batch, generator=gen, device=dev) < 0.1
        ctx = torch.where(drop[:, None, None], torch.zeros_like(ctx), ctx)
        u = torch.rand(args.batch, generator=gen, device=dev)
        sig = shift_sigma(u, TRAIN_SHIFT)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        s5 = sig[:, None, None, None, None]
        xt = (1 - s5) * x0 + s5 * noise
        target = noise - x0
        with bf16_autocast(cuda):
            try:
                pred = fwd(xt, sig * NUM_TRAIN_TIMESTEPS, ctx)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not lose the run
                if fwd is model:
                    raise
                log(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly", fh)
                fwd = model
                pred = fwd(xt, sig * NUM_TRAIN_TIMESTEPS, ctx)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema_list, d)
            torch._foreach_add_(ema_list, [p.detach() for p in live_list], alpha=1 - d)
        losses.append(loss.detach())
        step += 1
        if step == 10:
            if cuda:
                torch.cuda.synchronize()
            t_cal = time.time()
        if args.time_budget_s > 0 and step == 10 + args.calibrate:
            if cuda:
                torch.cuda.synchronize()
            per = (time.time() - t_cal) / args.calibrate
            fit = int((args.time_budget_s - (time.time() - t_start)) / per) + step
            if fit < total:
                log(f"calibration: {per * 1e3:.1f} ms/step -> --steps lowered from {total} to {fit} "
                    f"to fit --time-budget-s {args.time_budget_s:g}", fh)
                total = max(fit, step + 1)
            else:
                log(f"calibration: {per * 1e3:.1f} ms/step, {total} steps fit in {args.time_budget_s:g} s", fh)
        if step % args.log_every == 0 or step == total:
            losses = [float(v) for v in losses]  # syncs only here
            recent = float(np.mean(losses[-args.log_every:]))
            log(f"step {step}/{total} loss {recent:.4f} (last {args.log_every}) lr {lr:.2e} grad {float(gnorm):.2f} "
                f"{time.time() - t_start:.0f}s", fh)
    train_s = time.time() - t_start
    final_loss = float(np.mean(losses[-min(200, len(losses)):]))
    log(f"trained {total} steps x batch {args.batch} in {train_s:.1f} s; mean loss of the last "
        f"{min(200, len(losses))} steps {final_loss:.4f}", fh)

    # Export the EMA weights, f32, diffusers names.
    model.load_state_dict(ema)
    model.eval()
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(os.path.join(args.out, "diffusion_pytorch_model.safetensors"), weights,
                     {"format": "pt", "model": "denoised-demo", "seed": str(args.seed), "steps": str(total)})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_safetensors(os.path.join(args.out, "prompts.safetensors"), table,
                     {"tokens": str(TOKENS), "grammar": GRAMMAR, "vocabulary": " ".join(VOCAB),
                      "seed": str(args.seed)})

    # Eval with the EMA weights (f32 on the training device; bf16 autocast would differ from C++).
    t0 = time.time()
    seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    summ, results = run_eval(model, table, dev, args.eval_prompts, seeds, args.eval_steps, SAMPLE_GUIDANCE,
                             SAMPLE_SHIFT, "f32", fh, frames, size)
    eval_s = time.time() - t0
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({"summary": summ, "results": results}, f, indent=1)

    # Parity fixture from the exported weights (reloaded, so it is exactly what C++ reads).
    cpu_model = WanModel(cfg)
    w, _ = load_safetensors(os.path.join(args.out, "diffusion_pytorch_model.safetensors"))
    cpu_model.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    cpu_model.eval()
    tensors, meta = make_parity(cpu_model, table, args.seed)
    save_safetensors(os.path.join(args.out, "parity.safetensors"), tensors, meta)
    log(f"wrote {args.out}: config.json, diffusion_pytorch_model.safetensors, prompts.safetensors, "
        f"parity.safetensors, eval.json, train_log.txt, TRAINING.md (eval {eval_s:.0f} s)", fh)

    tot = summ["total"]
    lines = [
        "# denoised-demo: training record",
        "",
        "Written by `tools/train_demo_model.py` at the end of the run that produced the files in this folder.",
        "",
        f"- Command: `{cmd}`",
        f"- Card: {card}; torch {torch.__version__}; seed {args.seed}",
        f"- Model: Wan2.1 DiT, {cfg['num_layers']} layers, dim {model.dim} ({model.heads} heads x "
        f"{cfg['attention_head_dim']}), ffn {cfg['ffn_dim']}, text_dim {cfg['text_dim']}, patch 1x2x2, "
        f"pixel space (3 channels), {nparams} parameters",
        f"- Data: procedural clips {FRAMES} x {SIZE} x {SIZE}, shapes {SIDE_MIN}-{SIDE_MAX} px, speed {SPEEDS} px/frame; "
        f"prompts `{GRAMMAR}`, 10 % unconditional (zero embedding)",
        f"- Training: flow matching (v = noise - x0, t = 1000 sigma, sigma = shift_{TRAIN_SHIFT:g}(U(0,1))), "
        f"AdamW lr {args.lr:g} (warmup {args.warmup}, cosine to 5 %), batch {args.batch}, {total} steps, "
        f"EMA {args.ema} (exported), bf16 autocast on CUDA, weights exported in f32",
        f"- Training time: {train_s:.1f} s ({total} steps); final loss (mean of the last "
        f"{min(200, len(losses))} steps): {final_loss:.4f}",
        f"- To replay the same schedule: `python3 tools/train_demo_model.py --device {args.device} --seed {args.seed} "
        f"--steps {total} --batch {args.batch} --time-budget-s 0` (GPU kernels are not bit-deterministic, so "
        f"the weights match closely, not bit for bit)",
        "",
        "## Recommended sampling (C++ engine)",
        "",
        f"UniPC, {SAMPLE_STEPS} steps, guidance {SAMPLE_GUIDANCE:g}, shift {SAMPLE_SHIFT:g}, 8 frames x 32 x 32, e.g.",
        "`denoised run --backend cpu --model tools/demo_model --frames 8 --height 32 --width 32 "
        f"--steps {SAMPLE_STEPS} --guidance {SAMPLE_GUIDANCE:g} --shift {SAMPLE_SHIFT:g} --embeds E --out O`",
        "",
        f"## Eval (built-in, PyTorch f32, UniPC {args.eval_steps} steps, CFG {SAMPLE_GUIDANCE:g}, "
        f"shift {SAMPLE_SHIFT:g}; seeds {args.eval_seeds})",
        "",
        f"Colour {summ['colour']}/{tot}, shape {summ['shape']}/{tot}, direction {summ['direction']}/{tot}, "
        f"all three right {summ['all']}/{tot}.",
        "",
        "| seed | prompt | got (colour, shape, direction) | fill | motion px (dx, dy) | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = r["colour_ok"] and r["shape_ok"] and r["direction_ok"]
        lines.append(f"| {r['seed']} | {r['prompt']} | {', '.join(str(g) for g in r['got'])} | {r['fill']} | "
                     f"{r['motion_px']} | {'yes' if ok else 'NO'} |")
    lines += ["", "Analyser: foreground = brightest channel > 0; colour = nearest vocabulary colour to the mean "
              "foreground RGB; shape = median per-frame fill of the bounding box (> 0.9 square, > 0.67 circle, "
              "else triangle); direction = larger component of the centroid displacement first -> last frame "
              "(at least 2 px).", ""]
    with open(os.path.join(args.out, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines))
    fh.close()


if __name__ == "__main__":
    main()

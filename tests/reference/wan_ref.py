"""Independent float64 NumPy reference of the Wan2.1 T2V DiT forward pass.

Written from /work/shared/docs/wan-spec.md only (section numbers below refer to it):
  §1 config fields, §2 state-dict names/shapes (+ original-name renames), §3 forward pass
  (patch embed, sinusoid, time/text embedders, blocks with modulation, RMS-across-heads q/k norm,
  3-axis interleaved-pair RoPE, cross-attention, output head, unpatchify).
Extended from docs/MODELS.md (issue 15): the Wan2.1-I2V image embedder and image cross-attention (§4),
36/48-channel inputs, per-token timesteps of Wan2.2-TI2V-5B (§5) and unmerged LoRA on any Linear (§6).
Everything is computed in float64; weights of any stored dtype are widened to float64.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

import safetensors_np


# --------------------------------------------------------------------------------------------- config
@dataclass
class WanConfig:
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    ffn_dim: int
    num_layers: int
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    rope_max_seq_len: int = 1024
    vae_stride: tuple = (4, 8, 8)
    image_dim: object = None
    added_kv_proj_dim: object = None
    pos_embed_seq_len: object = None
    extra: dict = field(default_factory=dict)

    @property
    def dim(self):
        return self.num_heads * self.head_dim

    @property
    def patch_volume(self):
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def latent_shape(self, frames, height, width):
        """Pixel sizes -> latent [C_in, F, H, W] per vae_stride (frames = (F-1)*st + 1)."""
        st, sh, sw = self.vae_stride
        if (frames - 1) % st or height % sh or width % sw:
            raise ValueError(f"frames/height/width {frames}/{height}/{width} incompatible with vae_stride {self.vae_stride}")
        return (self.in_channels, (frames - 1) // st + 1, height // sh, width // sw)


def parse_config(src):
    """Parses a diffusers `config.json` (WanTransformer3DModel fields, §1) or an original Wan2.1 config
    (dim/num_heads/in_dim/out_dim/...). `src`: path to a file, to a model folder, or a dict."""
    if isinstance(src, dict):
        c = dict(src)
    else:
        path = os.path.join(src, "config.json") if os.path.isdir(src) else src
        with open(path) as f:
            c = json.load(f)

    def req(*names):
        for n in names:
            if n in c and c[n] is not None:
                return c[n]
        raise ValueError(f"config: missing field {' / '.join(names)}")

    if "num_attention_heads" in c or "attention_head_dim" in c:
        nh = int(req("num_attention_heads"))
        hd = int(req("attention_head_dim"))
        cin = int(req("in_channels"))
        cout = int(c.get("out_channels") or cin)
    else:  # original Wan naming (text_dim and patch_size are not saved by WanModel: class defaults)
        dim = int(req("dim"))
        nh = int(req("num_heads"))
        if dim % nh:
            raise ValueError(f"config: dim {dim} not divisible by num_heads {nh}")
        hd = dim // nh
        cin = int(req("in_dim"))
        cout = int(c.get("out_dim") or cin)
    patch = tuple(int(v) for v in c.get("patch_size", (1, 2, 2)))
    if len(patch) != 3:
        raise ValueError(f"config: patch_size must have 3 entries, got {patch}")
    vae = tuple(int(v) for v in (c.get("vae_stride") or (4, 8, 8)))
    if len(vae) != 3:
        raise ValueError(f"config: vae_stride must have 3 entries, got {vae}")
    text_dim = c.get("text_dim")
    if text_dim is None and not ("num_attention_heads" in c or "attention_head_dim" in c):
        text_dim = 4096  # MODELS.md §1: absent from original config.json files
    c["text_dim"] = text_dim
    qk = c.get("qk_norm", "rms_norm_across_heads")
    if qk is True:
        qk = "rms_norm_across_heads"
    if qk not in ("rms_norm_across_heads",):
        raise ValueError(f"config: qk_norm {qk!r} not supported by the reference")
    cfg = WanConfig(
        num_heads=nh, head_dim=hd, in_channels=cin, out_channels=cout,
        text_dim=int(req("text_dim")), freq_dim=int(req("freq_dim")), ffn_dim=int(req("ffn_dim")),
        num_layers=int(req("num_layers")), patch_size=patch, eps=float(c.get("eps", 1e-6)),
        cross_attn_norm=bool(c.get("cross_attn_norm", True)), qk_norm=qk,
        rope_max_seq_len=int(c.get("rope_max_seq_len", 1024)), vae_stride=vae,
        image_dim=c.get("image_dim"), added_kv_proj_dim=c.get("added_kv_proj_dim"),
        pos_embed_seq_len=c.get("pos_embed_seq_len"), extra=c)
    if cfg.freq_dim % 2:
        raise ValueError("config: freq_dim must be even")
    if cfg.head_dim % 2:
        raise ValueError("config: attention_head_dim must be even")
    if (cfg.image_dim is None) != (cfg.added_kv_proj_dim is None):
        raise ValueError("config: image_dim and added_kv_proj_dim must be both set or both null")
    if cfg.added_kv_proj_dim is not None and int(cfg.added_kv_proj_dim) != cfg.dim:
        # add_k_proj/add_v_proj read the image embedder's output, which has D channels (MODELS.md §2).
        raise ValueError(f"config: added_kv_proj_dim {cfg.added_kv_proj_dim} != inner dim {cfg.dim}")
    if cfg.pos_embed_seq_len is not None and cfg.image_dim is None:
        raise ValueError("config: pos_embed_seq_len needs image_dim")
    return cfg


# ------------------------------------------------------------------------------------ tensor names
_RENAMES = [  # original Wan2.1 -> diffusers (§2), applied to the whole name
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.q\.", r"blocks.\1.attn1.to_q."),
    (r"^blocks\.(\d+)\.self_attn\.k\.", r"blocks.\1.attn1.to_k."),
    (r"^blocks\.(\d+)\.self_attn\.v\.", r"blocks.\1.attn1.to_v."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.norm_q\.", r"blocks.\1.attn1.norm_q."),
    (r"^blocks\.(\d+)\.self_attn\.norm_k\.", r"blocks.\1.attn1.norm_k."),
    (r"^blocks\.(\d+)\.cross_attn\.q\.", r"blocks.\1.attn2.to_q."),
    (r"^blocks\.(\d+)\.cross_attn\.k\.", r"blocks.\1.attn2.to_k."),
    (r"^blocks\.(\d+)\.cross_attn\.v\.", r"blocks.\1.attn2.to_v."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_q\.", r"blocks.\1.attn2.norm_q."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_k\.", r"blocks.\1.attn2.norm_k."),
    (r"^blocks\.(\d+)\.cross_attn\.k_img\.", r"blocks.\1.attn2.add_k_proj."),
    (r"^blocks\.(\d+)\.cross_attn\.v_img\.", r"blocks.\1.attn2.add_v_proj."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_k_img\.", r"blocks.\1.attn2.norm_added_k."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    # Norm swap trap: original norm3 is the affine cross-attn LN = diffusers norm2.
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
]


def is_original_layout(names):
    return any(n.startswith(("head.", "time_embedding.")) or ".self_attn." in n or n.endswith(".modulation")
               for n in names)


def to_diffusers_names(state):
    """Returns the state dict under diffusers names; original Wan2.1 (optionally Comfy-prefixed) names
    are renamed per §2, diffusers names are kept as they are."""
    names = [n[len("model.diffusion_model."):] if n.startswith("model.diffusion_model.") else n for n in state]
    vals = list(state.values())
    if not is_original_layout(names):
        return dict(zip(names, vals))
    out = {}
    for n, v in zip(names, vals):
        m = n
        for pat, rep in _RENAMES:
            m2 = re.sub(pat, rep, m)
            if m2 != m:
                m = m2
                break
        if m in out:
            raise ValueError(f"rename collision on {m} (from {n})")
        out[m] = v
    return out


def expected_shapes(cfg):
    """Diffusers name -> shape for a T2V checkpoint (§2)."""
    D, Fd, pt, ph, pw = cfg.dim, cfg.ffn_dim, *cfg.patch_size
    s = {
        "patch_embedding.weight": (D, cfg.in_channels, pt, ph, pw), "patch_embedding.bias": (D,),
        "condition_embedder.time_embedder.linear_1.weight": (D, cfg.freq_dim),
        "condition_embedder.time_embedder.linear_1.bias": (D,),
        "condition_embedder.time_embedder.linear_2.weight": (D, D),
        "condition_embedder.time_embedder.linear_2.bias": (D,),
        "condition_embedder.time_proj.weight": (6 * D, D), "condition_embedder.time_proj.bias": (6 * D,),
        "condition_embedder.text_embedder.linear_1.weight": (D, cfg.text_dim),
        "condition_embedder.text_embedder.linear_1.bias": (D,),
        "condition_embedder.text_embedder.linear_2.weight": (D, D),
        "condition_embedder.text_embedder.linear_2.bias": (D,),
        "scale_shift_table": (1, 2, D),
        "proj_out.weight": (cfg.out_channels * pt * ph * pw, D),
        "proj_out.bias": (cfg.out_channels * pt * ph * pw,),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        s[b + "scale_shift_table"] = (1, 6, D)
        for a in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{b}{a}.{p}.weight"] = (D, D)
                s[f"{b}{a}.{p}.bias"] = (D,)
            s[f"{b}{a}.norm_q.weight"] = (D,)
            s[f"{b}{a}.norm_k.weight"] = (D,)
        s[b + "norm2.weight"] = (D,)
        s[b + "norm2.bias"] = (D,)
        s[b + "ffn.net.0.proj.weight"] = (Fd, D)
        s[b + "ffn.net.0.proj.bias"] = (Fd,)
        s[b + "ffn.net.2.weight"] = (D, Fd)
        s[b + "ffn.net.2.bias"] = (D,)
        if cfg.image_dim is not None:  # MODELS.md §2: image K/V per block
            kv = int(cfg.added_kv_proj_dim)
            for p in ("add_k_proj", "add_v_proj"):
                s[f"{b}attn2.{p}.weight"] = (D, kv)
                s[f"{b}attn2.{p}.bias"] = (D,)
            s[b + "attn2.norm_added_k.weight"] = (D,)
    if cfg.image_dim is not None:  # MODELS.md §2: image embedder
        ie, di = "condition_embedder.image_embedder.", int(cfg.image_dim)
        s[ie + "norm1.weight"] = (di,)
        s[ie + "norm1.bias"] = (di,)
        s[ie + "ff.net.0.proj.weight"] = (di, di)
        s[ie + "ff.net.0.proj.bias"] = (di,)
        s[ie + "ff.net.2.weight"] = (D, di)
        s[ie + "ff.net.2.bias"] = (D,)
        s[ie + "norm2.weight"] = (D,)
        s[ie + "norm2.bias"] = (D,)
        if cfg.pos_embed_seq_len is not None:
            s[ie + "pos_embed"] = (1, int(cfg.pos_embed_seq_len), di)
    return s


def linear_module_names(cfg):
    """Diffusers names of every Linear (the modules a LoRA may target), MODELS.md §6."""
    return sorted(n[:-len(".weight")] for n, shp in expected_shapes(cfg).items()
                  if n.endswith(".weight") and len(shp) == 2 and not n.startswith("patch_embedding"))


def check_state_dict(cfg, state):
    """List of human-readable problems (missing/unexpected/mis-shaped tensors); empty when OK."""
    exp = expected_shapes(cfg)
    problems = []
    state = {n: v for n, v in state.items() if ".norm_added_q." not in n}  # ignored by diffusers (MODELS.md §2)
    for n, shp in exp.items():
        if n not in state:
            problems.append(f"missing tensor {n}")
        elif tuple(state[n].shape) != shp:
            problems.append(f"tensor {n}: shape {tuple(state[n].shape)} != expected {shp}")
    for n in state:
        if n not in exp:
            problems.append(f"unexpected tensor {n}")
    return problems


def load_model(model_dir):
    """(config, float64 diffusers-named weights) from a checkpoint folder."""
    cfg = parse_config(model_dir)
    raw = safetensors_np.load_model_dir(model_dir)
    state = {k: np.asarray(v, dtype=np.float64) for k, v in to_diffusers_names(raw).items()}
    problems = check_state_dict(cfg, state)
    if problems:
        raise ValueError(f"{model_dir}: " + "; ".join(problems[:8]))
    return cfg, state


# ----------------------------------------------------------------------------------- building blocks
def linear(x, w, b):
    """PyTorch Linear: x W^T + b with W [out, in]."""
    return x @ w.T + b


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, eps, weight=None, bias=None):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, weight, eps):
    """RMS over the whole last dim (all heads together: 'rms_norm_across_heads')."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def timestep_sinusoid(t, freq_dim):
    """§3.3: [cos(t w_j), sin(t w_j)], w_j = exp(-ln(10000) j / half), j < half."""
    half = freq_dim // 2
    w = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    a = np.asarray(t, dtype=np.float64)[:, None] * w[None, :]
    return np.concatenate([np.cos(a), np.sin(a)], axis=-1)


def rope_split(head_dim):
    """§3.7: (t_dim, h_dim, w_dim) = (d - 4*floor(d/6), 2*floor(d/6), 2*floor(d/6))."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(head_dim, grid, theta=10000.0, max_pos=1024):
    """Angles [L, head_dim/2] for the (F', H', W') token grid in frame-major order (§3.2, §3.7)."""
    Fp, Hp, Wp = grid
    if max(Fp, Hp, Wp) > max_pos:
        raise ValueError(f"grid {grid} exceeds rope_max_seq_len {max_pos}")
    dims = rope_split(head_dim)
    ladders = [theta ** (-np.arange(0, dim // 2, dtype=np.float64) * 2.0 / dim) for dim in dims]
    f, h, w = np.meshgrid(np.arange(Fp), np.arange(Hp), np.arange(Wp), indexing="ij")
    pos = [f.reshape(-1).astype(np.float64), h.reshape(-1).astype(np.float64), w.reshape(-1).astype(np.float64)]
    return np.concatenate([p[:, None] * lad[None, :] for p, lad in zip(pos, ladders)], axis=1)


def apply_rope(x, angles):
    """x [B, L, Nh, d]; rotates interleaved pairs (2k, 2k+1) by angles[:, k] (GPT-J style)."""
    c = np.cos(angles)[None, :, None, :]
    s = np.sin(angles)[None, :, None, :]
    xe, xo = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = xe * c - xo * s
    y[..., 1::2] = xe * s + xo * c
    return y


def attention(q, k, v):
    """q [B, Lq, Nh, d], k/v [B, Lk, Nh, d] -> [B, Lq, Nh*d]; full softmax, no mask, scale 1/sqrt(d)."""
    d = q.shape[-1]
    s = np.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhlm,bmhd->blhd", p, v)
    return o.reshape(o.shape[0], o.shape[1], -1)


def patchify(x, patch):
    """x [B, C, F, H, W] -> tokens [B, L, C*pt*ph*pw] with (c, pt, ph, pw) flattening (c slowest) and
    token n = f*H'*W' + h*W' + w. Returns (tokens, grid)."""
    B, C, F, H, W = x.shape
    pt, ph, pw = patch
    if F % pt or H % ph or W % pw:
        raise ValueError(f"latent {x.shape[2:]} not divisible by patch {patch}")
    Fp, Hp, Wp = F // pt, H // ph, W // pw
    y = x.reshape(B, C, Fp, pt, Hp, ph, Wp, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return y.reshape(B, Fp * Hp * Wp, C * pt * ph * pw), (Fp, Hp, Wp)


def unpatchify(y, grid, patch, c_out):
    """§3.9: [B, L, pt*ph*pw*C] (c fastest) -> [B, C, F'*pt, H'*ph, W'*pw]."""
    B = y.shape[0]
    Fp, Hp, Wp = grid
    pt, ph, pw = patch
    z = y.reshape(B, Fp, Hp, Wp, pt, ph, pw, c_out).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return z.reshape(B, c_out, Fp * pt, Hp * ph, Wp * pw)


# -------------------------------------------------------------------------------------------- forward
_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_exact(x):
    """erf GELU (nn.GELU() default), used by the I2V image embedder only (MODELS.md §4)."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def lora_linear(v, W, name, lora=None):
    """Linear `name` of W on v, plus every unmerged adapter of `lora` on it (see forward)."""
    y = linear(v, W[name + ".weight"], W[name + ".bias"])
    for A, Bm, factor, bias_delta in (lora or {}).get(name, ()):
        y = y + factor * ((v @ A.T) @ Bm.T)
        if bias_delta is not None:
            y = y + bias_delta
    return y


def image_embed(cfg, W, image_embeds, lora=None):
    """MODELS.md §4: LN(eps 1e-5) -> Linear -> exact GELU -> Linear -> LN(eps 1e-5), per token.
    image_embeds [B, N, image_dim] -> [B, N', D] (N' = 2N with FLF2V's pos_embed)."""
    c = np.asarray(image_embeds, dtype=np.float64)
    ie = "condition_embedder.image_embedder."
    if ie + "pos_embed" in W:
        B, n, di = c.shape
        c = c.reshape(-1, 2 * n, di) + W[ie + "pos_embed"]
    u = layer_norm(c, 1e-5, W[ie + "norm1.weight"], W[ie + "norm1.bias"])
    u = gelu_exact(lora_linear(u, W, ie + "ff.net.0.proj", lora))
    u = lora_linear(u, W, ie + "ff.net.2", lora)
    return layer_norm(u, 1e-5, W[ie + "norm2.weight"], W[ie + "norm2.bias"])


def time_embeddings(cfg, W, t, lora=None):
    """(temb, tproj) for timestep values t of any shape S: [*S, D] and [*S, 6, D] (W §3.3-4, MODELS.md §5).
    The embedder runs once on the distinct values of t (one GEMM over them, sorted) and rows are gathered,
    so equal timesteps give bit-identical embeddings whatever the shape of t."""
    t = np.asarray(t, dtype=np.float64)
    uniq, idx = np.unique(t.reshape(-1), return_inverse=True)
    ce = "condition_embedder."
    s = timestep_sinusoid(uniq, cfg.freq_dim)
    temb = lora_linear(silu(lora_linear(s, W, ce + "time_embedder.linear_1", lora)), W,
                       ce + "time_embedder.linear_2", lora)
    tproj = lora_linear(silu(temb), W, ce + "time_proj", lora)
    D = cfg.dim
    return temb[idx].reshape(*t.shape, D), tproj[idx].reshape(*t.shape, 6, D)


def forward(cfg, W, x, t, ctx, return_intermediates=False, image_embeds=None, lora=None):
    """Wan DiT forward (W §3 + MODELS.md §4-6).
    x [B, C_in, F, H, W]; t [B] (one timestep per sample) or [B, L] (one per token, TI2V-5B); ctx [B, T, text_dim]
    (used as is: any zero padding must already be in ctx); image_embeds [B, N, image_dim] iff cfg.image_dim;
    lora: optional {module name: [(A [r,in], B [out,r], factor, bias_delta or None), ...]} applied unmerged:
    y = x W^T + b + sum factor * (x A^T) B^T (+ bias_delta). Returns the flow velocity [B, C_out, F, H, W]."""
    x = np.asarray(x, dtype=np.float64)
    ctx = np.asarray(ctx, dtype=np.float64)
    B = x.shape[0]
    if x.ndim != 5 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"hidden_states shape {x.shape}, expected [B, {cfg.in_channels}, F, H, W]")
    if ctx.ndim != 3 or ctx.shape[0] != B or ctx.shape[2] != cfg.text_dim:
        raise ValueError(f"encoder_hidden_states shape {ctx.shape}, expected [{B}, T, {cfg.text_dim}]")
    if (image_embeds is None) != (cfg.image_dim is None):
        raise ValueError("image_embeds must be given exactly when the model has an image embedder (image_dim)")
    D, Nh, d, eps = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.eps
    lora = lora or {}

    def lin(v, name):
        return lora_linear(v, W, name, lora)

    # 2. patch embedding (Conv3d with kernel = stride = patch) as a GEMM.
    tokens, grid = patchify(x, cfg.patch_size)
    L = tokens.shape[1]
    X = linear(tokens, W["patch_embedding.weight"].reshape(D, -1), W["patch_embedding.bias"])
    # 1./7. RoPE angles for the grid.
    ang = rope_angles(d, grid, max_pos=cfg.rope_max_seq_len)

    # 3./4. time embedding: per sample [B, 1, .] or per token [B, L, .] (MODELS.md §5).
    t = np.asarray(t, dtype=np.float64)
    if t.ndim == 2:
        if t.shape != (B, L):
            raise ValueError(f"per-token timestep shape {t.shape}, expected [{B}, {L}]")
        tt = t
    else:
        tt = np.broadcast_to(t.reshape(-1), (B,))[:, None]
    temb, tproj = time_embeddings(cfg, W, tt, lora)  # [B, L|1, D], [B, L|1, 6, D]

    # 5. text embedding (+ image tokens, MODELS.md §4).
    ce = "condition_embedder."
    c2 = lin(gelu_tanh(lin(ctx, ce + "text_embedder.linear_1")), ce + "text_embedder.linear_2")
    T = c2.shape[1]
    img = image_embed(cfg, W, image_embeds, lora) if image_embeds is not None else None

    inter = {"temb": temb, "tproj": tproj, "ctx": c2, "img": img, "x_embed": X.copy()}
    # 6. blocks.
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        e = W[p + "scale_shift_table"][0] + tproj  # [B, L|1, 6, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (e[:, :, j] for j in range(6))
        h = layer_norm(X, eps) * (1.0 + scale1) + shift1
        a1 = p + "attn1."
        q = rms_norm(lin(h, a1 + "to_q"), W[a1 + "norm_q.weight"], eps)
        k = rms_norm(lin(h, a1 + "to_k"), W[a1 + "norm_k.weight"], eps)
        v = lin(h, a1 + "to_v")
        q = apply_rope(q.reshape(B, L, Nh, d), ang)
        k = apply_rope(k.reshape(B, L, Nh, d), ang)
        a = attention(q, k, v.reshape(B, L, Nh, d))
        X = X + lin(a, a1 + "to_out.0") * gate1

        h2 = layer_norm(X, eps, W[p + "norm2.weight"], W[p + "norm2.bias"]) if cfg.cross_attn_norm else X
        a2 = p + "attn2."
        qc = rms_norm(lin(h2, a2 + "to_q"), W[a2 + "norm_q.weight"], eps).reshape(B, L, Nh, d)
        kc = rms_norm(lin(c2, a2 + "to_k"), W[a2 + "norm_k.weight"], eps)
        vc = lin(c2, a2 + "to_v")
        ac = attention(qc, kc.reshape(B, T, Nh, d), vc.reshape(B, T, Nh, d))
        if img is not None:  # separate softmax over the image tokens, summed before to_out (MODELS.md §4)
            Ni = img.shape[1]
            ki = rms_norm(lin(img, a2 + "add_k_proj"), W[a2 + "norm_added_k.weight"], eps)
            vi = lin(img, a2 + "add_v_proj")
            ac = ac + attention(qc, ki.reshape(B, Ni, Nh, d), vi.reshape(B, Ni, Nh, d))
        X = X + lin(ac, a2 + "to_out.0")

        h3 = layer_norm(X, eps) * (1.0 + scale2) + shift2
        f = lin(gelu_tanh(lin(h3, p + "ffn.net.0.proj")), p + "ffn.net.2")
        X = X + f * gate2
        inter[f"block{i}"] = X.copy()

    # 8. head: modulation from temb (pre-SiLU), shift first then scale; per token for TI2V.
    hm = W["scale_shift_table"][0] + temb[:, :, None, :]  # [B, L|1, 2, D]
    shift, scale = hm[:, :, 0], hm[:, :, 1]
    Y = lin(layer_norm(X, eps) * (1.0 + scale) + shift, "proj_out")
    # 9. unpatchify.
    out = unpatchify(Y, grid, cfg.patch_size, cfg.out_channels)
    if return_intermediates:
        return out, inter
    return out

"""Independent float64 reference of the Wan2.1 samplers (§4 of /work/shared/docs/wan-spec.md).

- Sigma/timestep schedules: diffusers UniPC flow sigmas (with the sigma_0 -= 1e-6 quirk and int64
  truncation of t), the original Wan2.1 variant, and diffusers FlowMatchEulerDiscrete (the min end is
  shifted twice; float timesteps).
- UniPC-bh2 (flow prediction, predict_x0, solver_order 2, lower_order_final, final sigma 0).
- Flow-match Euler.
- Classifier-free guidance v = v_u + g (v_c - v_u) (only when g > 1).
Model convention: x_sigma = (1 - sigma) x0 + sigma eps, v ~ eps - x0, x0 = x - sigma v.

Extended from docs/MODELS.md (issue 15): the two-expert switch with per-expert guidance (§3), the I2V
36-channel input (§4) and the TI2V first-frame conditioning with per-token timesteps (§5).
"""

import math

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u, shift):
    u = np.asarray(u, dtype=np.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def unipc_schedule(n, shift, variant="diffusers"):
    """Returns (sigmas [n+1] with sigmas[n] = 0, timesteps [n] int64 = trunc(sigma*1000))."""
    if n < 1:
        raise ValueError("steps must be >= 1")
    if variant == "diffusers":
        u = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, n + 1)[:n]
    elif variant == "original":
        u = np.linspace(0.999, 0.0, n + 1)[:n]
    else:
        raise ValueError(f"unknown schedule variant {variant}")
    sig = shift_sigma(u, shift)
    if abs(sig[0] - 1.0) < 1e-6:
        sig[0] -= 1e-6
    t = (sig * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncation toward zero
    return np.append(sig, 0.0), t


def euler_schedule(n, shift):
    """diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps(n): returns (sigmas [n+1], t [n] float)."""
    if n < 1:
        raise ValueError("steps must be >= 1")
    sigma_max = 1.0                               # shift(1) == 1
    sigma_min = float(shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift))  # init-time shifted minimum
    tt = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, n)
    sig = shift_sigma(tt / NUM_TRAIN_TIMESTEPS, shift)  # shifted again (quirk)
    return np.append(sig, 0.0), sig * NUM_TRAIN_TIMESTEPS


def _lam(sigma):
    """lambda(sigma) = ln(1 - sigma) - ln(sigma); +inf at sigma = 0."""
    if sigma == 0.0:
        return math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _phi(h):
    return -1.0 if math.isinf(h) else math.expm1(-h)


def unipc_sample(model, x, sigmas, timesteps, solver_order=2, lower_order_final=True, trace=None,
                 after_step=None):
    """UniPC-bh2 multistep (flow, predict_x0). model(x, t_i, i) -> velocity. Returns the final sample
    (= last x0 prediction since sigma_n = 0). `trace`, if a list, receives per-step dicts. `after_step`, if
    given, maps the sample before the first step and after every step (x = after_step(x)), as the original
    Wan2.2 TI2V loop re-imposes the conditioned frame (MODELS.md §5)."""
    x = np.asarray(x, dtype=np.float64).copy()
    if after_step is not None:
        x = after_step(x)
    n = len(timesteps)
    M = []                 # last x0 predictions (most recent last)
    last_sample = None
    prev_order = 0
    for i in range(n):
        s_i = float(sigmas[i])
        v = np.asarray(model(x, timesteps[i], i), dtype=np.float64)
        m = x - s_i * v
        corr_order = 0
        if i > 0:  # UniC corrector, order = prev_order, from sigma_{i-1} to sigma_i
            s_p = float(sigmas[i - 1])
            h = _lam(s_i) - _lam(s_p)
            ph = _phi(h)
            a_i = 1.0 - s_i
            base = (s_i / s_p) * last_sample - a_i * ph * M[-1]
            if prev_order == 1:
                x = base - a_i * ph * 0.5 * (m - M[-1])
            else:
                r = (_lam(float(sigmas[i - 2])) - _lam(s_p)) / h
                dm = (M[-2] - M[-1]) / r
                g1 = ph / (-h) - 1.0
                g2 = g1 / (-h) - 0.5
                rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([g1 / ph, 2.0 * g2 / ph]))
                x = base - a_i * ph * (rho[0] * dm + rho[1] * (m - M[-1]))
            corr_order = prev_order
        M.append(m)
        if len(M) > solver_order:
            M.pop(0)
        p = min(solver_order, n - i) if lower_order_final else solver_order
        p = min(p, i + 1)
        if p > 2:
            raise NotImplementedError("reference implements solver_order <= 2")
        last_sample = x
        prev_order = p
        s_n = float(sigmas[i + 1])
        a_n = 1.0 - s_n
        h = _lam(s_n) - _lam(s_i)
        ph = _phi(h)
        x_next = (s_n / s_i) * x - a_n * ph * m
        if p == 2:
            r = (_lam(float(sigmas[i - 1])) - _lam(s_i)) / h
            x_next = x_next - a_n * ph * 0.5 * (M[-2] - m) / r
        if trace is not None:
            trace.append({"i": i, "t": timesteps[i], "sigma": s_i, "corrector_order": corr_order,
                          "predictor_order": p})
        x = x_next if after_step is None else after_step(x_next)
    return x


def euler_sample(model, x, sigmas, timesteps, trace=None, after_step=None):
    """Flow-match Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i. `after_step` as in unipc_sample."""
    x = np.asarray(x, dtype=np.float64).copy()
    if after_step is not None:
        x = after_step(x)
    for i in range(len(timesteps)):
        v = np.asarray(model(x, timesteps[i], i), dtype=np.float64)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
        if after_step is not None:
            x = after_step(x)
        if trace is not None:
            trace.append({"i": i, "t": timesteps[i], "sigma": float(sigmas[i])})
    return x


def cfg_combine(v_cond, v_uncond, guidance):
    return v_uncond + guidance * (v_cond - v_uncond)


def make_schedule(scheduler, n, shift, fp32_sigmas=False):
    """(sigmas, timesteps). fp32_sigmas=True stores the sigmas as float32, as diffusers does
    (UniPC: `sigmas.astype(np.float32)` after computing the int timesteps from float64; Euler: float32
    tensors, t = sigma * 1000 in float32). Note sigma_0 = 1 - 1e-6 becomes 0.99999899 in float32, so
    alpha_0 = 1 - sigma_0 differs by ~1.3% between the two; this moves UniPC results by ~1e-6."""
    if scheduler == "unipc":
        sig, t = unipc_schedule(n, shift)
    elif scheduler == "euler":
        sig, t = euler_schedule(n, shift)
    else:
        raise ValueError(f"unknown scheduler {scheduler}")
    if fp32_sigmas:
        sig = sig.astype(np.float32).astype(np.float64)
        if scheduler == "euler":
            t = (sig[:-1].astype(np.float32) * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float64)
    return sig, t


def sample(scheduler, model, x, n, shift, trace=None, fp32_sigmas=False):
    sig, t = make_schedule(scheduler, n, shift, fp32_sigmas)
    if scheduler == "unipc":
        return unipc_sample(model, x, sig, t, trace=trace)
    return euler_sample(model, x, sig, t, trace=trace)


def guided_model(forward, cond, uncond, guidance):
    """Wraps forward(x [1,C,F,H,W], t, ctx [1,T,td]) -> v into model(x [C,F,H,W], t, i) with CFG: the
    uncond branch runs (and v = v_u + g (v_c - v_u)) only when guidance > 1; both branches run as one
    batch of 2 (cond first). `uncond` None means zeros of the prompt's shape."""
    cond = np.asarray(cond, dtype=np.float64)
    if uncond is None:
        uncond = np.zeros_like(cond)
    uncond = np.asarray(uncond, dtype=np.float64)

    def model(x, t, i):
        if guidance > 1.0:
            if uncond.shape[0] != cond.shape[0]:
                vc = forward(x[None], [t], cond[None])[0]
                vu = forward(x[None], [t], uncond[None])[0]
            else:
                v = forward(np.stack([x, x]), [t, t], np.stack([cond, uncond]))
                vc, vu = v[0], v[1]
            return cfg_combine(vc, vu, guidance)
        return forward(x[None], [t], cond[None])[0]

    return model


# ------------------------------------------------------------------------------- MODELS.md §3: two experts
def expert_for(t, boundary_ratio):
    """0 (high-noise expert `transformer`, guidance_scale) if t >= boundary_ratio * 1000, else 1 (low-noise
    expert `transformer_2`, guidance_scale_2). t is the timestep fed to the model (int64 for UniPC)."""
    if boundary_ratio is None:
        return 0
    return 0 if t >= boundary_ratio * NUM_TRAIN_TIMESTEPS else 1


def expert_steps(timesteps, boundary_ratio):
    """Number of leading steps run by the high-noise expert."""
    e = [expert_for(t, boundary_ratio) for t in timesteps]
    k = e.count(0)
    if e != [0] * k + [1] * (len(e) - k):
        raise ValueError("timesteps not monotone: the expert switches more than once")
    return k


def pipeline_model(experts, cond, uncond, guidance, guidance_2=None, boundary_ratio=None, image_embeds=None,
                   condition=None, first_frame=None, patch=(1, 2, 2), trace=None):
    """Wraps expert forwards f(x [B,C,F,H,W], t ([B] or [B,L]), ctx [B,T,td], image_embeds or None) into
    model(x [C,F,H,W], t, i) for the samplers (MODELS.md §3-5):
    - experts: [f] or [f_high, f_low]; the expert and its guidance follow expert_for(t, boundary_ratio);
      guidance_2 defaults to guidance (diffusers); CFG runs iff guidance > 1 (diffusers: the first scale
      decides), as one batch of 2 (cond first);
    - image_embeds [N, image_dim]: the same for both CFG branches (Wan2.1 I2V);
    - condition [C_c, F, H, W]: concatenated after the sampler state on channels (I2V: mask 4 + latent 16);
    - first_frame (z [C,1,H,W], M [F,H,W]): model input (1 - M) z + M x and per-token t_n = M[f, ::ph, ::pw] t
      (TI2V); `trace`, if a list, receives (i, expert, guidance, t)."""
    cond = np.asarray(cond, dtype=np.float64)
    uncond = np.zeros_like(cond) if uncond is None else np.asarray(uncond, dtype=np.float64)
    if guidance_2 is None:
        guidance_2 = guidance
    if len(experts) == 2 and boundary_ratio is None:
        raise ValueError("two experts need a boundary_ratio")

    def model(x, t, i):
        e = expert_for(t, boundary_ratio) if len(experts) == 2 else 0
        g = guidance if e == 0 else guidance_2
        if trace is not None:
            trace.append((i, e, g, t))
        xin = np.asarray(x, dtype=np.float64)
        tt = np.asarray([t], dtype=np.float64)
        if first_frame is not None:
            z, M = first_frame
            xin = (1.0 - M[None]) * z + M[None] * xin
            tt = ti2v_token_timesteps(M, t, patch)[None]
        if condition is not None:
            xin = np.concatenate([xin, np.asarray(condition, dtype=np.float64)], axis=0)
        img = None if image_embeds is None else np.asarray(image_embeds, dtype=np.float64)[None]
        f = experts[e]
        if guidance > 1.0:
            if uncond.shape != cond.shape:
                vc = f(xin[None], tt, cond[None], img)[0]
                vu = f(xin[None], tt, uncond[None], img)[0]
            else:
                tb = np.concatenate([tt, tt])
                v = f(np.stack([xin, xin]), tb, np.stack([cond, uncond]),
                      None if img is None else np.concatenate([img, img]))
                vc, vu = v[0], v[1]
            return cfg_combine(vc, vu, g)
        return f(xin[None], tt, cond[None], img)[0]

    return model


# ------------------------------------------------------------------------------- MODELS.md §4: I2V condition
def i2v_mask(num_frames, latent_h, latent_w, last_frame=False, temporal_stride=4):
    """4-channel mask [4, F, h, w]: pixel-frame mask m (frame 0 = 1, and the last frame for FLF2V), frame 0
    repeated to 4 copies, grouped in fours: channel j of latent frame f = m[4f + j - 3] (m[0] for 4f + j < 4)."""
    if (num_frames - 1) % temporal_stride:
        raise ValueError(f"num_frames {num_frames} must be 1 mod {temporal_stride}")
    m = np.zeros(num_frames)
    m[0] = 1.0
    if last_frame:
        m[-1] = 1.0
    ext = np.concatenate([np.repeat(m[:1], temporal_stride), m[1:]])  # 4F frames
    F = len(ext) // temporal_stride
    per = ext.reshape(F, temporal_stride).T  # [4, F]
    return np.broadcast_to(per[:, :, None, None], (temporal_stride, F, latent_h, latent_w)).copy()


def i2v_condition(mask, image_latent):
    """The 20-channel condition: mask (4) then the normalised image latent (16), MODELS.md §4."""
    return np.concatenate([np.asarray(mask, np.float64), np.asarray(image_latent, np.float64)], axis=0)


# ------------------------------------------------------------------------------- MODELS.md §5: TI2V
def ti2v_first_frame_mask(F, H, W, conditioned=True):
    """M [F, H, W] over the latent grid: 0 on latent frame 0 when an image conditions the run, else 1."""
    M = np.ones((F, H, W))
    if conditioned:
        M[0] = 0.0
    return M


def ti2v_token_timesteps(M, t, patch=(1, 2, 2)):
    """Per-token timesteps [L]: t_n = M[f, ph*h, pw*w] * t in token order (f, h, w)."""
    pt, ph, pw = patch
    return (np.asarray(M, dtype=np.float64)[::pt, ::ph, ::pw] * float(t)).reshape(-1)


def ti2v_sample(scheduler, model, x, n, shift, z, M, variant="diffusers"):
    """TI2V sampling with the first frame conditioned on z [C,1,H,W] (model from pipeline_model(...,
    first_frame=(z, M))). 'diffusers': the sampler state keeps evolving on frame 0, replaced by z at the end;
    'original': (1 - M) z + M x is re-imposed before the first and after every step."""
    sig, t = make_schedule(scheduler, n, shift)
    blend = (lambda y: (1.0 - M[None]) * z + M[None] * y)
    hook = blend if variant == "original" else None
    if scheduler == "unipc":
        out = unipc_sample(model, x, sig, t, after_step=hook)
    else:
        out = euler_sample(model, x, sig, t, after_step=hook)
    return blend(out)

"""Independent float64 reference of the Wan2.1 samplers (§4 of /work/shared/docs/wan-spec.md).

- Sigma/timestep schedules: diffusers UniPC flow sigmas (with the sigma_0 -= 1e-6 quirk and int64
  truncation of t), the original Wan2.1 variant, and diffusers FlowMatchEulerDiscrete (the min end is
  shifted twice; float timesteps).
- UniPC-bh2 (flow prediction, predict_x0, solver_order 2, lower_order_final, final sigma 0).
- Flow-match Euler.
- Classifier-free guidance v = v_u + g (v_c - v_u) (only when g > 1).
Model convention: x_sigma = (1 - sigma) x0 + sigma eps, v ~ eps - x0, x0 = x - sigma v.
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


def unipc_sample(model, x, sigmas, timesteps, solver_order=2, lower_order_final=True, trace=None):
    """UniPC-bh2 multistep (flow, predict_x0). model(x, t_i, i) -> velocity. Returns the final sample
    (= last x0 prediction since sigma_n = 0). `trace`, if a list, receives per-step dicts."""
    x = np.asarray(x, dtype=np.float64).copy()
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
        x = x_next
    return x


def euler_sample(model, x, sigmas, timesteps, trace=None):
    """Flow-match Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i."""
    x = np.asarray(x, dtype=np.float64).copy()
    for i in range(len(timesteps)):
        v = np.asarray(model(x, timesteps[i], i), dtype=np.float64)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
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

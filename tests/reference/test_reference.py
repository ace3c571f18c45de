"""Self-tests of the NumPy reference (safetensors I/O, config/name parsing, schedules, RoPE, samplers,
forward-pass layout). Run: python3 -m unittest discover -s tests/reference -p "test_*.py"."""

import json
import math
import os
import struct
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_np as st  # noqa: E402
import samplers_ref as sr  # noqa: E402
import wan_ref as wr  # noqa: E402

TINY = {  # the engine's tiny preset, diffusers field names
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 4,
    "attention_head_dim": 16, "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 256,
    "ffn_dim": 128, "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
    "vae_stride": [4, 8, 8]}


def random_state(cfg, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in wr.expected_shapes(cfg).items():
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm2.weight"):
            out[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            out[name] = scale * rng.standard_normal(shape)
    return out


class SafetensorsTest(unittest.TestCase):
    def test_roundtrip_all_dtypes(self):
        rng = np.random.default_rng(1)
        a = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b.c": rng.standard_normal(7).astype(np.float32)}
        with tempfile.TemporaryDirectory() as d:
            for dt, tol in (("F32", 0.0), ("F16", 1e-3), ("BF16", 8e-3)):
                p = os.path.join(d, dt + ".safetensors")
                st.save_file(a, p, dtype=dt, metadata={"format": "pt"})
                self.assertEqual(set(st.tensor_dtypes(p).values()), {dt})
                b = st.load_file(p)
                self.assertEqual(set(b), set(a))
                for k in a:
                    self.assertEqual(b[k].shape, a[k].shape)
                    np.testing.assert_allclose(b[k].astype(np.float64), a[k], rtol=tol, atol=1e-30)
                with open(p, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    self.assertEqual(n % 8, 0)
                    hdr = json.loads(f.read(n))
                    self.assertEqual(hdr["__metadata__"], {"format": "pt"})

    def test_bf16_round_to_nearest_even(self):
        one_ulp = 2.0 ** -7
        vals = np.array([1.0 + one_ulp / 2, 1.0 + 1.5 * one_ulp, -3.0, 1.0 + 0.6 * one_ulp], np.float32)
        got = st.round_to_bf16(vals)
        np.testing.assert_array_equal(got, np.array([1.0, 1.0 + 2 * one_ulp, -3.0, 1.0 + one_ulp], np.float32))

    def test_handwritten_file(self):
        # A file built byte by byte: header per the format description, F32 [2] then BF16 [1].
        hdr = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "y": {"dtype": "BF16", "shape": [1], "data_offsets": [8, 10]}}).encode()
        data = struct.pack("<ff", 1.5, -2.0) + struct.pack("<H", 0x4049)  # bf16 0x4049 = 3.140625
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "h.safetensors")
            with open(p, "wb") as f:
                f.write(struct.pack("<Q", len(hdr)) + hdr + data)
            t = st.load_file(p)
            np.testing.assert_array_equal(t["x"], [1.5, -2.0])
            self.assertEqual(float(t["y"][0]), 3.140625)

    def test_sharded_index(self):
        with tempfile.TemporaryDirectory() as d:
            st.save_file({"a": np.ones(2)}, os.path.join(d, "m-00001-of-00002.safetensors"))
            st.save_file({"b": np.zeros(3)}, os.path.join(d, "m-00002-of-00002.safetensors"))
            with open(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": {"a": "m-00001-of-00002.safetensors",
                                                          "b": "m-00002-of-00002.safetensors"}}, f)
            t = st.load_model_dir(d)
            self.assertEqual(sorted(t), ["a", "b"])
            self.assertEqual(t["b"].shape, (3,))

    def test_bad_offsets_rejected(self):
        hdr = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "bad.safetensors")
            with open(p, "wb") as f:
                f.write(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
            with self.assertRaises(st.SafetensorsError):
                st.load_file(p)


class ConfigAndNamesTest(unittest.TestCase):
    def test_diffusers_config(self):
        c = wr.parse_config(TINY)
        self.assertEqual((c.dim, c.num_heads, c.head_dim, c.patch_size, c.vae_stride), (64, 4, 16, (1, 2, 2), (4, 8, 8)))
        self.assertEqual(c.latent_shape(5, 32, 48), (16, 2, 4, 6))
        self.assertEqual(c.latent_shape(81, 480, 832), (16, 21, 60, 104))
        c2 = wr.parse_config({**TINY, "vae_stride": None, "patch_size": [1, 1, 1]})
        self.assertEqual((c2.vae_stride, c2.patch_size), ((4, 8, 8), (1, 1, 1)))
        with self.assertRaises(ValueError):
            c.latent_shape(6, 32, 48)

    def test_original_config(self):
        c = wr.parse_config({"dim": 1536, "num_heads": 12, "in_dim": 16, "out_dim": 16, "ffn_dim": 8960,
                             "freq_dim": 256, "text_dim": 4096, "num_layers": 30, "qk_norm": True,
                             "patch_size": [1, 2, 2], "eps": 1e-6})
        self.assertEqual((c.dim, c.head_dim, c.num_layers), (1536, 128, 30))

    def test_counts_match_spec(self):
        for nl, d, nh, ff, total in ((30, 128, 12, 8960, 825), (40, 128, 40, 13824, 1095)):
            c = wr.parse_config({**TINY, "num_layers": nl, "num_attention_heads": nh, "attention_head_dim": d,
                                 "ffn_dim": ff, "text_dim": 4096})
            shapes = wr.expected_shapes(c)
            self.assertEqual(len(shapes), total)
            params = sum(int(np.prod(s)) for s in shapes.values())
            if nl == 30:
                self.assertAlmostEqual(params / 1e9, 1.419, delta=0.001)
            else:
                self.assertAlmostEqual(params / 1e9, 14.289, delta=0.001)

    def test_original_names(self):
        c = wr.parse_config(TINY)
        W = random_state(c)
        inv = {}
        for n, v in W.items():  # diffusers -> original, written out by hand from §2
            o = (n.replace("condition_embedder.time_embedder.linear_1", "time_embedding.0")
                 .replace("condition_embedder.time_embedder.linear_2", "time_embedding.2")
                 .replace("condition_embedder.time_proj", "time_projection.1")
                 .replace("condition_embedder.text_embedder.linear_1", "text_embedding.0")
                 .replace("condition_embedder.text_embedder.linear_2", "text_embedding.2")
                 .replace("attn1.to_out.0", "self_attn.o").replace("attn2.to_out.0", "cross_attn.o")
                 .replace("attn1.to_", "self_attn.").replace("attn2.to_", "cross_attn.")
                 .replace("attn1.", "self_attn.").replace("attn2.", "cross_attn.")
                 .replace("ffn.net.0.proj", "ffn.0").replace("ffn.net.2", "ffn.2")
                 .replace("proj_out", "head.head").replace(".norm2.", ".norm3."))
            if n == "scale_shift_table":
                o = "head.modulation"
            elif n.endswith(".scale_shift_table"):
                o = n.replace("scale_shift_table", "modulation")
            inv["model.diffusion_model." + o] = v
        self.assertIn("model.diffusion_model.blocks.1.norm3.weight", inv)
        back = wr.to_diffusers_names(inv)
        self.assertEqual(set(back), set(W))
        for n in W:
            self.assertIs(back[n], W[n])
        self.assertEqual(wr.check_state_dict(c, back), [])
        self.assertEqual(wr.to_diffusers_names(W).keys(), W.keys())


class ScheduleTest(unittest.TestCase):
    def test_diffusers_unipc_n50_shift5(self):
        sig, t = sr.unipc_schedule(50, 5.0)
        self.assertEqual(list(t[:5]), [999, 995, 991, 987, 982])
        self.assertEqual(list(t[-2:]), [175, 96])
        self.assertEqual(len(t), 50)
        self.assertEqual(len(sig), 51)
        self.assertEqual(sig[-1], 0.0)
        self.assertAlmostEqual(sig[0], 1.0 - 1e-6, places=12)  # the sigma_0 quirk
        self.assertTrue(np.all(np.diff(sig) < 0))

    def test_original_unipc_n50_shift5(self):
        _, t = sr.unipc_schedule(50, 5.0, variant="original")
        self.assertEqual(list(t[:5]), [999, 995, 991, 987, 982])
        self.assertEqual(list(t[-2:]), [172, 92])

    def test_unipc_small(self):
        sig, t = sr.unipc_schedule(4, 3.0)
        u = np.array([1.0, 0.75025, 0.5005, 0.25075])
        np.testing.assert_allclose(sig[1:4], 3 * u[1:] / (1 + 2 * u[1:]), rtol=1e-14)
        self.assertEqual(list(t), [999, int(3000 * 0.75025 / 2.5005), int(3000 * 0.5005 / 2.001), int(3000 * 0.25075 / 1.5015)])

    def test_fp32_sigma_storage(self):
        sig, t = sr.make_schedule("unipc", 4, 3.0, fp32_sigmas=True)
        self.assertEqual(sig[0], float(np.float32(1.0 - 1e-6)))
        self.assertEqual(list(t), list(sr.unipc_schedule(4, 3.0)[1]))  # t from float64, as diffusers
        self.assertGreater(abs((1 - sig[0]) / 1e-6 - 1), 0.01)  # alpha_0 moves by ~1.3%
        sig, t = sr.make_schedule("euler", 3, 5.0, fp32_sigmas=True)
        np.testing.assert_array_equal(t, (sig[:-1].astype(np.float32) * np.float32(1000)).astype(np.float64))

    def test_euler_double_shift(self):
        sig, t = sr.euler_schedule(3, 5.0)
        smin = 5 * 0.001 / (1 + 4 * 0.001)
        mid = (1.0 + smin) / 2
        expect = [1.0, 5 * mid / (1 + 4 * mid), 5 * smin / (1 + 4 * smin), 0.0]
        np.testing.assert_allclose(sig, expect, rtol=1e-14)
        np.testing.assert_allclose(t, 1000 * np.array(expect[:3]), rtol=1e-14)
        self.assertGreater(sig[2], 4 * smin)  # shifted twice: far above shift(1/1000)
        self.assertEqual(list(sr.euler_schedule(1, 3.0)[0]), [1.0, 0.0])


class RopeTest(unittest.TestCase):
    def test_split(self):
        self.assertEqual(wr.rope_split(128), (44, 42, 42))
        self.assertEqual(wr.rope_split(16), (8, 4, 4))
        self.assertEqual(wr.rope_split(6), (2, 2, 2))

    def test_angles_layout(self):
        ang = wr.rope_angles(128, (3, 4, 5))
        self.assertEqual(ang.shape, (60, 64))
        n = 2 * 20 + 3 * 5 + 4  # token (f=2, h=3, w=4)
        np.testing.assert_allclose(ang[n, :22], 2 * 10000.0 ** (-np.arange(22) * 2 / 44))
        np.testing.assert_allclose(ang[n, 22:43], 3 * 10000.0 ** (-np.arange(21) * 2 / 42))
        np.testing.assert_allclose(ang[n, 43:], 4 * 10000.0 ** (-np.arange(21) * 2 / 42))

    def test_rotation_of_known_vector(self):
        # head_dim 6: one frequency (=1) per axis; token (f=1, h=2, w=3) rotates pairs by 1, 2, 3 rad.
        ang = wr.rope_angles(6, (2, 3, 4))
        n = 1 * 12 + 2 * 4 + 3
        np.testing.assert_allclose(ang[n], [1.0, 2.0, 3.0])
        x = np.zeros((1, 24, 1, 6))
        x[0, n, 0] = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0]
        y = wr.apply_rope(x, ang)[0, n, 0]
        np.testing.assert_allclose(y, [math.cos(1), math.sin(1), -math.sin(2), math.cos(2),
                                       2 * math.cos(3), 2 * math.sin(3)], atol=1e-15)

    def test_matches_complex_formulation_and_is_relative(self):
        rng = np.random.default_rng(3)
        ang = wr.rope_angles(16, (3, 2, 3))
        x = rng.standard_normal((1, 18, 2, 16))
        y = wr.apply_rope(x, ang)
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)[None, :, None, :]  # view_as_complex style
        np.testing.assert_allclose(y[..., 0::2], z.real, atol=1e-14)
        np.testing.assert_allclose(y[..., 1::2], z.imag, atol=1e-14)
        q, k = rng.standard_normal(16), rng.standard_normal(16)
        grid = (6, 6, 6)
        a = wr.rope_angles(16, grid)
        idx = lambda f, h, w: (f * 6 + h) * 6 + w
        rot = lambda v, n: wr.apply_rope(v.reshape(1, 1, 1, 16), a[n:n + 1])[0, 0, 0]
        d1 = rot(q, idx(1, 2, 3)) @ rot(k, idx(0, 1, 1))
        d2 = rot(q, idx(4, 5, 3)) @ rot(k, idx(3, 4, 1))
        self.assertAlmostEqual(d1, d2, places=12)


def _linear_path_model(x0, eps):
    def model(x, t, i):
        return eps - x0  # the true velocity of x_sigma = (1 - sigma) x0 + sigma eps
    return model


def _gaussian_problem(s=2.0):
    """Data ~ N(0, s^2): the ideal x0 prediction is linear in x; the exact flow ODE scales x by the
    marginal std sqrt((1-sigma)^2 s^2 + sigma^2)."""
    std = lambda sig: math.sqrt((1 - sig) ** 2 * s * s + sig * sig)
    sched = {}

    def model(x, t, i):
        sig = sched["sig"][i]
        d = (1 - sig) * s * s / ((1 - sig) ** 2 * s * s + sig * sig) * x
        return (x - d) / sig
    return model, std, sched


def _generic_unipc(model, x, sig, ts, order=2):
    """Second, independent transcription of UniPC-bh2 in the generic R/b (rhos) form."""
    lam = lambda s_: math.inf if s_ == 0 else math.log(1 - s_) - math.log(s_)
    outs, last, this_order = [], None, 0
    for i in range(len(ts)):
        v = model(x, ts[i], i)
        m_t = x - sig[i] * v
        if i > 0:
            h = lam(sig[i]) - lam(sig[i - 1])
            hh = -h
            rks, d1s = [], []
            for k in range(1, this_order):
                rk = (lam(sig[i - 1 - k]) - lam(sig[i - 1])) / h
                rks.append(rk)
                d1s.append((outs[-(k + 1)] - outs[-1]) / rk)
            rks.append(1.0)
            rks = np.array(rks)
            hp1 = math.expm1(hh)
            hpk = hp1 / hh - 1
            fac, R, b = 1, [], []
            for k in range(1, this_order + 1):
                R.append(rks ** (k - 1))
                b.append(hpk * fac / hp1)
                fac *= k + 1
                hpk = hpk / hh - 1 / fac
            rhos = np.array([0.5]) if this_order == 1 else np.linalg.solve(np.array(R), np.array(b))
            corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
            x = sig[i] / sig[i - 1] * last - (1 - sig[i]) * hp1 * outs[-1] \
                - (1 - sig[i]) * hp1 * (corr + rhos[-1] * (m_t - outs[-1]))
        outs = (outs + [m_t])[-order:]
        this_order = min(order, len(ts) - i, i + 1)
        last = x
        if sig[i + 1] == 0:
            x = outs[-1]
            continue
        h = lam(sig[i + 1]) - lam(sig[i])
        hh = -h
        hp1 = math.expm1(hh)
        x_ = sig[i + 1] / sig[i] * x - (1 - sig[i + 1]) * hp1 * outs[-1]
        if this_order == 2:
            r1 = (lam(sig[i - 1]) - lam(sig[i])) / h
            x_ = x_ - (1 - sig[i + 1]) * hp1 * 0.5 * (outs[-2] - outs[-1]) / r1
        x = x_
    return x


class SamplerTest(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(7)
        self.x0 = rng.standard_normal((4, 2, 3))
        self.eps = rng.standard_normal((4, 2, 3))

    def test_unipc_recovers_x0_on_linear_path(self):
        for n, shift in ((1, 3.0), (2, 3.0), (4, 5.0), (7, 1.0), (50, 5.0)):
            sig, t = sr.unipc_schedule(n, shift)
            x1 = (1 - sig[0]) * self.x0 + sig[0] * self.eps
            trace = []
            out = sr.unipc_sample(_linear_path_model(self.x0, self.eps), x1, sig, t, trace=trace)
            np.testing.assert_allclose(out, self.x0, atol=1e-10, err_msg=f"n={n} shift={shift}")
        # order rules for 50 steps: predictor 1,2,...,2,1; corrector 0 (none), 1, 2, ...
        self.assertEqual([s["predictor_order"] for s in trace], [1] + [2] * 48 + [1])
        self.assertEqual([s["corrector_order"] for s in trace], [0, 1] + [2] * 48)

    def test_unipc_intermediates_stay_on_path(self):
        sig, t = sr.unipc_schedule(6, 3.0)
        seen = []

        def model(x, tt, i):
            seen.append(np.abs(x - ((1 - sig[i]) * self.x0 + sig[i] * self.eps)).max())
            return self.eps - self.x0
        sr.unipc_sample(model, (1 - sig[0]) * self.x0 + sig[0] * self.eps, sig, t)
        self.assertLess(max(seen), 1e-12)

    def test_euler_recovers_x0_on_linear_path(self):
        for n, shift in ((1, 5.0), (3, 5.0), (10, 3.0)):
            sig, t = sr.euler_schedule(n, shift)
            x1 = (1 - sig[0]) * self.x0 + sig[0] * self.eps
            out = sr.euler_sample(_linear_path_model(self.x0, self.eps), x1, sig, t)
            np.testing.assert_allclose(out, self.x0, atol=1e-12)

    def test_unipc_matches_generic_form(self):
        model, _, sched = _gaussian_problem()
        for n in (1, 2, 3, 5, 12):
            sig, t = sr.unipc_schedule(n, 3.0)
            sched["sig"] = sig
            a = sr.unipc_sample(model, self.eps, sig, t)
            b = _generic_unipc(model, self.eps, list(sig), t)
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"n={n}")

    def test_convergence_orders(self):
        model, std, sched = _gaussian_problem()
        errs = {}
        for name in ("unipc", "euler"):
            for n in (10, 20, 40):
                sig, t = sr.make_schedule(name, n, 1.0)
                sched["sig"] = sig
                x1 = self.eps * std(sig[0])
                out = sr.sample(name, model, x1, n, 1.0)
                errs[(name, n)] = np.abs(out - self.eps * std(0.0)).max()
        # Euler is first order; UniPC-bh2 (order 2 + corrector) converges much faster.
        self.assertGreater(errs[("euler", 20)] / errs[("euler", 40)], 1.6)
        self.assertGreater(errs[("unipc", 20)] / errs[("unipc", 40)], 3.5)
        self.assertLess(errs[("unipc", 40)], errs[("euler", 40)] / 20)

    def test_cfg(self):
        vc, vu = np.full(3, 2.0), np.full(3, 0.5)
        np.testing.assert_allclose(sr.cfg_combine(vc, vu, 4.5), 0.5 + 4.5 * 1.5)
        calls = []

        def fwd(x, t, ctx):
            calls.append(ctx.shape[0])
            return np.broadcast_to(ctx.sum(axis=(1, 2))[:, None, None, None, None], x.shape).copy()
        cond = np.ones((2, 3))
        m = sr.guided_model(fwd, cond, None, 1.0)
        np.testing.assert_allclose(m(np.zeros((1, 1, 1, 1)), 5, 0), 6.0)
        m = sr.guided_model(fwd, cond, None, 3.0)  # uncond = zeros -> v = 0 + 3 (6 - 0)
        np.testing.assert_allclose(m(np.zeros((1, 1, 1, 1)), 5, 0), 18.0)
        self.assertEqual(calls, [1, 2])


def _naive_forward(cfg, W, x, t, ctx):
    """Loop-based restatement of §3 for one sample, used to cross-check the vectorised layout code."""
    C, F, H, Wd = x.shape
    pt, ph, pw = cfg.patch_size
    Fp, Hp, Wp = F // pt, H // ph, Wd // pw
    D, Nh, d, eps = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.eps
    L = Fp * Hp * Wp
    pos = []
    X = np.zeros((L, D))
    K = W["patch_embedding.weight"]
    for f in range(Fp):
        for h in range(Hp):
            for w in range(Wp):
                n = f * Hp * Wp + h * Wp + w
                pos.append((f, h, w))
                patch = x[:, f * pt:(f + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
                X[n] = np.tensordot(K, patch, axes=([1, 2, 3, 4], [0, 1, 2, 3])) + W["patch_embedding.bias"]
    half = cfg.freq_dim // 2
    s = np.array([math.cos(t * 10000 ** (-j / half)) for j in range(half)] +
                 [math.sin(t * 10000 ** (-j / half)) for j in range(half)])
    ce = "condition_embedder."
    lin = lambda v, p: v @ W[p + ".weight"].T + W[p + ".bias"]
    temb = lin(wr.silu(lin(s, ce + "time_embedder.linear_1")), ce + "time_embedder.linear_2")
    tp = lin(wr.silu(temb), ce + "time_proj")
    c2 = lin(wr.gelu_tanh(lin(ctx, ce + "text_embedder.linear_1")), ce + "text_embedder.linear_2")
    td, hd, _ = wr.rope_split(d)

    def rope(vec, p):  # vec [D]: every head's complex pairs rotated by the same angles
        f, h, w = p
        out = vec.copy()
        for k in range(D // 2):
            k, base = k % (d // 2), (k // (d // 2)) * d
            if k < td // 2:
                a = f * 10000.0 ** (-2 * k / td)
            elif k < td // 2 + hd // 2:
                a = h * 10000.0 ** (-2 * (k - td // 2) / hd)
            else:
                a = w * 10000.0 ** (-2 * (k - td // 2 - hd // 2) / hd)
            z = complex(vec[base + 2 * k], vec[base + 2 * k + 1]) * complex(math.cos(a), math.sin(a))
            out[base + 2 * k], out[base + 2 * k + 1] = z.real, z.imag
        return out

    def ln(v):
        return (v - v.mean()) / math.sqrt(v.var() + eps)

    def rms(v, g):
        return v / math.sqrt((v * v).mean() + eps) * g

    def attn(qs, ks, vs):  # lists of [D]
        out = np.zeros((len(qs), D))
        for hh in range(Nh):
            sl = slice(hh * d, (hh + 1) * d)
            for a_, qv in enumerate(qs):
                sc = np.array([qv[sl] @ kv[sl] / math.sqrt(d) for kv in ks])
                p = np.exp(sc - sc.max())
                p /= p.sum()
                out[a_, sl] = sum(pi * vv[sl] for pi, vv in zip(p, vs))
        return out

    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        e = W[b + "scale_shift_table"][0] + tp.reshape(6, D)
        hs = [ln(X[n]) * (1 + e[1]) + e[0] for n in range(L)]
        qs = [rope(rms(lin(hv, b + "attn1.to_q"), W[b + "attn1.norm_q.weight"]), pos[n]) for n, hv in enumerate(hs)]
        ks = [rope(rms(lin(hv, b + "attn1.to_k"), W[b + "attn1.norm_k.weight"]), pos[n]) for n, hv in enumerate(hs)]
        vs = [lin(hv, b + "attn1.to_v") for hv in hs]
        X = X + lin(attn(qs, ks, vs), b + "attn1.to_out.0") * e[2]
        h2 = [ln(X[n]) * W[b + "norm2.weight"] + W[b + "norm2.bias"] for n in range(L)]
        qs = [rms(lin(hv, b + "attn2.to_q"), W[b + "attn2.norm_q.weight"]) for hv in h2]
        ks = [rms(lin(cv, b + "attn2.to_k"), W[b + "attn2.norm_k.weight"]) for cv in c2]
        vs = [lin(cv, b + "attn2.to_v") for cv in c2]
        X = X + lin(attn(qs, ks, vs), b + "attn2.to_out.0")
        h3 = np.array([ln(X[n]) * (1 + e[4]) + e[3] for n in range(L)])
        X = X + lin(wr.gelu_tanh(lin(h3, b + "ffn.net.0.proj")), b + "ffn.net.2") * e[5]
    shift = W["scale_shift_table"][0, 0] + temb
    scale = W["scale_shift_table"][0, 1] + temb
    Y = np.array([lin(ln(X[n]) * (1 + scale) + shift, "proj_out") for n in range(L)])
    out = np.zeros((cfg.out_channels, F, H, Wd))
    for n, (f, h, w) in enumerate(pos):
        for a in range(pt):
            for b_ in range(ph):
                for c_ in range(pw):
                    for ch in range(cfg.out_channels):
                        out[ch, f * pt + a, h * ph + b_, w * pw + c_] = Y[n, ((a * ph + b_) * pw + c_) * cfg.out_channels + ch]
    return out


class ForwardTest(unittest.TestCase):
    def setUp(self):
        self.cfg = wr.parse_config({**TINY, "ffn_dim": 48, "num_attention_heads": 2, "attention_head_dim": 16})
        self.W = random_state(self.cfg, seed=11, scale=0.3)
        rng = np.random.default_rng(5)
        self.x = rng.standard_normal((2, 16, 3, 4, 6))
        self.ctx = rng.standard_normal((2, 5, 32))

    def test_patchify_roundtrip_and_index(self):
        rng = np.random.default_rng(2)
        x = rng.standard_normal((1, 3, 4, 6, 8))
        tok, grid = wr.patchify(x, (2, 2, 2))
        self.assertEqual(grid, (2, 3, 4))
        n = 1 * 12 + 2 * 4 + 3  # (f=1, h=2, w=3)
        c, a, b, cc = 2, 1, 0, 1
        self.assertEqual(tok[0, n, ((c * 2 + a) * 2 + b) * 2 + cc], x[0, c, 2 + a, 4 + b, 6 + cc])
        y = tok.reshape(1, 24, 3, 8).transpose(0, 1, 3, 2).reshape(1, 24, 24)  # (p..., c) c fastest
        np.testing.assert_array_equal(wr.unpatchify(y, grid, (2, 2, 2), 3), x)

    def test_matches_naive_loops(self):
        t = np.array([999.0, 437.25])
        got = wr.forward(self.cfg, self.W, self.x, t, self.ctx)
        self.assertEqual(got.shape, (2, 16, 3, 4, 6))
        for b in range(2):
            ref = _naive_forward(self.cfg, self.W, self.x[b], float(t[b]), self.ctx[b])
            np.testing.assert_allclose(got[b], ref, rtol=1e-10, atol=1e-10)

    def test_batch_independence_and_sensitivity(self):
        t = [500, 500]
        both = wr.forward(self.cfg, self.W, self.x, t, self.ctx)
        one = wr.forward(self.cfg, self.W, self.x[1:], t[1:], self.ctx[1:])
        np.testing.assert_allclose(both[1], one[0], rtol=1e-12, atol=1e-12)
        other_t = wr.forward(self.cfg, self.W, self.x[1:], [501], self.ctx[1:])
        self.assertGreater(np.abs(other_t - one).max(), 1e-6)
        padded = np.concatenate([self.ctx[1:], np.zeros((1, 3, 32))], axis=1)  # zero padding is attended
        self.assertGreater(np.abs(wr.forward(self.cfg, self.W, self.x[1:], [500], padded) - one).max(), 1e-6)

    def test_load_model_from_files(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({**TINY, "ffn_dim": 48, "num_attention_heads": 2}, f)
            st.save_file(self.W, os.path.join(d, "diffusion_pytorch_model.safetensors"), dtype="F32")
            cfg, W = wr.load_model(d)
            self.assertEqual(cfg.num_heads, 2)
            np.testing.assert_allclose(W["proj_out.weight"], self.W["proj_out.weight"], rtol=1e-6)
            del_one = {k: v for k, v in self.W.items() if k != "blocks.1.norm2.bias"}
            st.save_file(del_one, os.path.join(d, "diffusion_pytorch_model.safetensors"))
            with self.assertRaisesRegex(ValueError, "blocks.1.norm2.bias"):
                wr.load_model(d)


if __name__ == "__main__":
    unittest.main()

"""Self-tests of the reference for the models of docs/MODELS.md (issue 15): two experts, Wan2.1 I2V image
cross-attention and 36-channel input, TI2V-5B per-token timesteps and first-frame conditioning, LoRA.
Run: python3 -m unittest discover -s tests/reference -p "test_*.py"."""

import json
import math
import os
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_ref as lr  # noqa: E402
import safetensors_np as st  # noqa: E402
import samplers_ref as sr  # noqa: E402
import wan_ref as wr  # noqa: E402

BASE = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
        "out_channels": 16, "text_dim": 32, "freq_dim": 256, "ffn_dim": 48, "num_layers": 2,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
        "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
I2V = {**BASE, "in_channels": 36, "image_dim": 24, "added_kv_proj_dim": 32}
TI2V = {**BASE, "in_channels": 48, "out_channels": 48, "vae_stride": [4, 16, 16]}


def random_state(cfg, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in wr.expected_shapes(cfg).items():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight", "norm1.weight", "norm_added_k.weight")):
            out[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            out[name] = scale * rng.standard_normal(shape)
    return out


def big(nh, ff, nl, cin, cout, image=False):
    c = {**BASE, "num_attention_heads": nh, "attention_head_dim": 128, "in_channels": cin, "out_channels": cout,
         "text_dim": 4096, "ffn_dim": ff, "num_layers": nl}
    if image:
        c.update(image_dim=1280, added_kv_proj_dim=nh * 128)
    return wr.parse_config(c)


class ConfigTest(unittest.TestCase):
    def test_counts_match_models_md(self):
        for cfg, tensors, params in ((big(40, 13824, 40, 16, 16), 1095, 14288491584),
                                     (big(40, 13824, 40, 36, 16), 1095, 14288901184),
                                     (big(40, 13824, 40, 36, 16, True), 1303, 16394878784),
                                     (big(24, 14336, 30, 48, 48), 825, 4999787712)):
            s = wr.expected_shapes(cfg)
            self.assertEqual(len(s), tensors)
            self.assertEqual(sum(int(np.prod(v)) for v in s.values()), params)
        s = wr.expected_shapes(big(24, 14336, 30, 48, 48))
        self.assertEqual(s["proj_out.weight"], (192, 3072))
        self.assertEqual(s["patch_embedding.weight"], (3072, 48, 1, 2, 2))
        s = wr.expected_shapes(big(40, 13824, 40, 36, 16, True))
        self.assertEqual(s["blocks.39.attn2.add_k_proj.weight"], (5120, 5120))
        self.assertEqual(s["condition_embedder.image_embedder.ff.net.2.weight"], (5120, 1280))

    def test_token_counts(self):
        c = wr.parse_config(TI2V)
        self.assertEqual(c.latent_shape(121, 704, 1280), (48, 31, 44, 80))
        self.assertEqual(31 * 22 * 40, 27280)
        with self.assertRaises(ValueError):
            c.latent_shape(121, 720, 1288)
        c = wr.parse_config(I2V)
        self.assertEqual(c.latent_shape(81, 720, 1280), (36, 21, 90, 160))

    def test_bad_image_config(self):
        with self.assertRaises(ValueError):
            wr.parse_config({**BASE, "image_dim": 24})
        with self.assertRaises(ValueError):
            wr.parse_config({**I2V, "added_kv_proj_dim": 31})

    def test_original_config_without_text_dim(self):
        c = wr.parse_config({"model_type": "ti2v", "dim": 3072, "num_heads": 24, "in_dim": 48, "out_dim": 48,
                             "ffn_dim": 14336, "freq_dim": 256, "num_layers": 30, "eps": 1e-6, "text_len": 512})
        self.assertEqual((c.text_dim, c.patch_size, c.dim), (4096, (1, 2, 2), 3072))

    def test_original_i2v_names(self):
        c = wr.parse_config(I2V)
        W = random_state(c)
        orig = {}
        for n, v in W.items():
            o = (n.replace("condition_embedder.image_embedder.norm1", "img_emb.proj.0")
                 .replace("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1")
                 .replace("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3")
                 .replace("condition_embedder.image_embedder.norm2", "img_emb.proj.4")
                 .replace("attn2.add_k_proj", "cross_attn.k_img").replace("attn2.add_v_proj", "cross_attn.v_img")
                 .replace("attn2.norm_added_k", "cross_attn.norm_k_img")
                 .replace("condition_embedder.time_embedder.linear_1", "time_embedding.0")
                 .replace("condition_embedder.time_embedder.linear_2", "time_embedding.2")
                 .replace("condition_embedder.time_proj", "time_projection.1")
                 .replace("condition_embedder.text_embedder.linear_1", "text_embedding.0")
                 .replace("condition_embedder.text_embedder.linear_2", "text_embedding.2")
                 .replace("attn1.to_out.0", "self_attn.o").replace("attn2.to_out.0", "cross_attn.o")
                 .replace("attn1.to_", "self_attn.").replace("attn2.to_", "cross_attn.")
                 .replace("attn1.", "self_attn.").replace("attn2.", "cross_attn.")
                 .replace("ffn.net.0.proj", "ffn.0").replace("ffn.net.2", "ffn.2")
                 .replace("proj_out", "head.head").replace(".norm2.", ".norm3."))
            o = "head.modulation" if n == "scale_shift_table" else o.replace("scale_shift_table", "modulation")
            orig[o] = v
        self.assertIn("blocks.1.cross_attn.k_img.weight", orig)
        self.assertIn("img_emb.proj.4.bias", orig)
        orig["blocks.0.cross_attn.norm_added_q.weight"] = np.ones(32)  # ignored, as diffusers does
        back = wr.to_diffusers_names(orig)
        self.assertEqual(wr.check_state_dict(c, back), [])
        for n in W:
            self.assertIs(back[n], W[n])


class ExpertSwitchTest(unittest.TestCase):
    def test_switch_step_for_defaults(self):
        for n, shift, b, k in ((40, 12.0, 0.875, 26), (40, 3.0, 0.875, 13), (40, 5.0, 0.9, 15),
                               (50, 3.0, 0.875, 16)):
            _, t = sr.unipc_schedule(n, shift)
            self.assertEqual(sr.expert_steps(t, b), k, (n, shift, b))
            self.assertGreaterEqual(t[k - 1], b * 1000)
            self.assertLess(t[k], b * 1000)
        _, t = sr.unipc_schedule(40, 3.0)
        self.assertEqual(t[12], 875)  # exactly at the boundary: high-noise expert (>=)
        _, t = sr.unipc_schedule(40, 12.0, variant="original")
        self.assertEqual(sr.expert_steps(t, 0.875), 26)
        self.assertEqual((sr.expert_for(875, 0.875), sr.expert_for(874, 0.875)), (0, 1))
        self.assertEqual((sr.expert_for(900, 0.9), sr.expert_for(899.999, 0.9)), (0, 1))
        self.assertEqual(sr.expert_for(0, None), 0)
        with self.assertRaises(ValueError):
            sr.expert_steps([900, 100, 950], 0.5)

    def _experts(self):
        c = wr.parse_config(BASE)
        Wh, Wl = random_state(c, 1), random_state(c, 2)
        fh = lambda x, t, ctx, img: wr.forward(c, Wh, x, t, ctx)
        fl = lambda x, t, ctx, img: wr.forward(c, Wl, x, t, ctx)
        return c, fh, fl

    def test_two_expert_sampling(self):
        c, fh, fl = self._experts()
        rng = np.random.default_rng(3)
        cond, neg = rng.standard_normal((5, 32)), rng.standard_normal((5, 32))
        x1 = rng.standard_normal((16, 2, 4, 4))
        n, shift, b, g1, g2 = 6, 3.0, 0.875, 4.0, 3.0
        sig, t = sr.unipc_schedule(n, shift)
        k = sr.expert_steps(t, b)
        self.assertTrue(0 < k < n)
        trace = []
        out = sr.unipc_sample(sr.pipeline_model([fh, fl], cond, neg, g1, g2, b, trace=trace), x1, sig, t)
        self.assertEqual([e for _, e, _, _ in trace], [0] * k + [1] * (n - k))
        self.assertEqual([g for _, _, g, _ in trace], [g1] * k + [g2] * (n - k))

        # Same result from a hand-written piecewise model; the sampler is NOT reset at the switch.
        def piecewise(x, tt, i):
            f, g = (fh, g1) if i < k else (fl, g2)
            vc = f(x[None], [tt], cond[None], None)[0]
            vu = f(x[None], [tt], neg[None], None)[0]
            return vu + g * (vc - vu)
        np.testing.assert_allclose(out, sr.unipc_sample(piecewise, x1, sig, t), rtol=1e-12, atol=1e-12)
        restarted = sr.unipc_sample(piecewise, x1, sig[:k + 1], t[:k])  # history lost at the switch
        restarted = sr.unipc_sample(lambda x, tt, i: piecewise(x, tt, i + k), restarted, sig[k:], t[k:])
        self.assertGreater(np.abs(restarted - out).max(), 1e-6)
        # Swapping the guidance pair or the experts changes the result.
        self.assertGreater(np.abs(sr.unipc_sample(sr.pipeline_model([fh, fl], cond, neg, g2, g1, b), x1, sig, t)
                                  - out).max(), 1e-6)
        self.assertGreater(np.abs(sr.unipc_sample(sr.pipeline_model([fl, fh], cond, neg, g1, g2, b), x1, sig, t)
                                  - out).max(), 1e-6)

    def test_identical_experts_equal_one_model(self):
        c, fh, _ = self._experts()
        rng = np.random.default_rng(4)
        cond = rng.standard_normal((5, 32))
        x1 = rng.standard_normal((16, 2, 4, 4))
        sig, t = sr.unipc_schedule(5, 5.0)
        one = sr.unipc_sample(sr.pipeline_model([fh], cond, None, 5.0), x1, sig, t)
        two = sr.unipc_sample(sr.pipeline_model([fh, fh], cond, None, 5.0, None, 0.9), x1, sig, t)
        np.testing.assert_array_equal(one, two)  # guidance_2 defaults to guidance
        self.assertEqual(sr.expert_steps(t, 0.9) < 5, True)
        with self.assertRaises(ValueError):
            sr.pipeline_model([fh, fh], cond, None, 5.0)


class I2VTest(unittest.TestCase):
    def setUp(self):
        self.cfg = wr.parse_config(I2V)
        self.W = random_state(self.cfg, 5)
        rng = np.random.default_rng(6)
        self.x = rng.standard_normal((2, 36, 2, 4, 4))
        self.ctx = rng.standard_normal((2, 5, 32))
        self.img = rng.standard_normal((2, 7, 24))

    def test_mask_and_condition_layout(self):
        m = sr.i2v_mask(81, 3, 5)
        self.assertEqual(m.shape, (4, 21, 3, 5))
        self.assertTrue(np.all(m[:, 0] == 1) and np.all(m[:, 1:] == 0))
        m = sr.i2v_mask(9, 1, 1, last_frame=True)  # FLF2V: last latent frame channels (0, 0, 0, 1)
        self.assertEqual(list(m[:, 2, 0, 0]), [0, 0, 0, 1])
        self.assertEqual(list(m[:, 1, 0, 0]), [0, 0, 0, 0])
        with self.assertRaises(ValueError):
            sr.i2v_mask(80, 1, 1)
        rng = np.random.default_rng(0)
        lat = rng.standard_normal((16, 21, 3, 5))
        cond = sr.i2v_condition(m_ := sr.i2v_mask(81, 3, 5), lat)
        noise = rng.standard_normal((16, 21, 3, 5))
        seen = []
        model = sr.pipeline_model([lambda x, t, c, i: (seen.append(x), x[:, :16])[1]], np.zeros((1, 2)), None, 1.0,
                                  condition=cond)
        model(noise, 999, 0)
        xin = seen[0][0]
        self.assertEqual(xin.shape[0], 36)
        np.testing.assert_array_equal(xin[:16], noise)  # noise first,
        np.testing.assert_array_equal(xin[16:20], m_)  # then the 4 mask channels,
        np.testing.assert_array_equal(xin[20:], lat)  # then the image latent

    def test_image_embedder_per_token(self):
        emb = wr.image_embed(self.cfg, self.W, self.img)
        ie = "condition_embedder.image_embedder."
        W = self.W
        c = self.img[1, 3]
        u = (c - c.mean()) / math.sqrt(c.var() + 1e-5) * W[ie + "norm1.weight"] + W[ie + "norm1.bias"]
        u = W[ie + "ff.net.0.proj.weight"] @ u + W[ie + "ff.net.0.proj.bias"]
        u = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in u])
        u = W[ie + "ff.net.2.weight"] @ u + W[ie + "ff.net.2.bias"]
        u = (u - u.mean()) / math.sqrt(u.var() + 1e-5) * W[ie + "norm2.weight"] + W[ie + "norm2.bias"]
        np.testing.assert_allclose(emb[1, 3], u, rtol=1e-12, atol=1e-12)
        self.assertGreater(np.abs(wr.gelu_exact(np.array([1.0])) - wr.gelu_tanh(np.array([1.0]))).max(), 1e-5)

    def test_zero_image_values_reduce_to_text_only(self):
        W0 = dict(self.W)
        for i in range(self.cfg.num_layers):
            for p in ("weight", "bias"):
                n = f"blocks.{i}.attn2.add_v_proj.{p}"
                W0[n] = np.zeros_like(W0[n])
        got = wr.forward(self.cfg, W0, self.x, [700, 300], self.ctx, image_embeds=self.img)
        t2v_cfg = wr.parse_config({**I2V, "image_dim": None, "added_kv_proj_dim": None})
        t2v_W = {n: v for n, v in W0.items() if n in wr.expected_shapes(t2v_cfg)}
        np.testing.assert_array_equal(got, wr.forward(t2v_cfg, t2v_W, self.x, [700, 300], self.ctx))
        full = wr.forward(self.cfg, self.W, self.x, [700, 300], self.ctx, image_embeds=self.img)
        self.assertGreater(np.abs(full - got).max(), 1e-6)

    def test_two_softmaxes_not_one(self):
        # One block, FFN output zeroed, cross-attn to_out = identity: block output - (same with to_out = 0)
        # is the raw cross-attention output o of forward, compared with a hand computation.
        cfg = wr.parse_config({**I2V, "num_layers": 1})
        W = random_state(cfg, 13)
        D, Nh, d, eps = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.eps
        for p in ("weight", "bias"):
            W[f"blocks.0.ffn.net.2.{p}"] = np.zeros_like(W[f"blocks.0.ffn.net.2.{p}"])
        W["blocks.0.attn2.to_out.0.weight"] = np.eye(D)
        W["blocks.0.attn2.to_out.0.bias"] = np.zeros(D)
        W0 = {**W, "blocks.0.attn2.to_out.0.weight": np.zeros((D, D))}
        args = (self.x[:1], [500], self.ctx[:1])
        _, full = wr.forward(cfg, W, *args, return_intermediates=True, image_embeds=self.img[:1])
        _, zero = wr.forward(cfg, W0, *args, return_intermediates=True, image_embeds=self.img[:1])
        o = (full["block0"] - zero["block0"])[0]
        h2 = wr.layer_norm(zero["block0"][0], eps, W["blocks.0.norm2.weight"], W["blocks.0.norm2.bias"])
        ctx2, img2 = full["ctx"][0], full["img"][0]
        a2 = "blocks.0.attn2."
        rms = lambda v, g: v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g
        lin = lambda v, n: v @ W[a2 + n + ".weight"].T + W[a2 + n + ".bias"]
        q = rms(lin(h2, "to_q"), W[a2 + "norm_q.weight"])
        kt, vt = rms(lin(ctx2, "to_k"), W[a2 + "norm_k.weight"]), lin(ctx2, "to_v")
        ki, vi = rms(lin(img2, "add_k_proj"), W[a2 + "norm_added_k.weight"]), lin(img2, "add_v_proj")

        def attn(K, V):
            out = np.zeros((len(q), D))
            for hh in range(Nh):
                sl = slice(hh * d, (hh + 1) * d)
                sc = q[:, sl] @ K[:, sl].T / math.sqrt(d)
                pr = np.exp(sc - sc.max(1, keepdims=True))
                out[:, sl] = (pr / pr.sum(1, keepdims=True)) @ V[:, sl]
            return out
        separate = attn(kt, vt) + attn(ki, vi)
        joint = attn(np.concatenate([ki, kt]), np.concatenate([vi, vt]))
        np.testing.assert_allclose(o, separate, rtol=1e-9, atol=1e-9)
        self.assertGreater(np.abs(joint - separate).max(), 1e-3)

    def test_image_embeds_required_and_refused(self):
        with self.assertRaises(ValueError):
            wr.forward(self.cfg, self.W, self.x, [1, 1], self.ctx)
        t2v_cfg = wr.parse_config(BASE)
        with self.assertRaises(ValueError):
            wr.forward(t2v_cfg, random_state(t2v_cfg), self.x[:, :16], [1, 1], self.ctx, image_embeds=self.img)

    def test_condition_and_image_change_the_output(self):
        base = wr.forward(self.cfg, self.W, self.x[:1], [600], self.ctx[:1], image_embeds=self.img[:1])
        x2 = self.x[:1].copy()
        x2[:, 30] += 1.0  # an image-latent channel
        self.assertGreater(np.abs(wr.forward(self.cfg, self.W, x2, [600], self.ctx[:1],
                                             image_embeds=self.img[:1]) - base).max(), 1e-6)
        self.assertGreater(np.abs(wr.forward(self.cfg, self.W, self.x[:1], [600], self.ctx[:1],
                                             image_embeds=self.img[1:]) - base).max(), 1e-6)


class TI2VTest(unittest.TestCase):
    def setUp(self):
        self.cfg = wr.parse_config(TI2V)
        self.W = random_state(self.cfg, 7)
        rng = np.random.default_rng(8)
        self.x = rng.standard_normal((2, 48, 3, 4, 6))
        self.ctx = rng.standard_normal((2, 5, 32))
        self.L = 3 * 2 * 3

    def test_token_timesteps(self):
        M = sr.ti2v_first_frame_mask(3, 4, 6)
        tt = sr.ti2v_token_timesteps(M, 937)
        self.assertEqual(tt.shape, (self.L,))
        self.assertTrue(np.all(tt[:6] == 0) and np.all(tt[6:] == 937))
        self.assertTrue(np.all(sr.ti2v_token_timesteps(sr.ti2v_first_frame_mask(3, 4, 6, False), 937) == 937))

    def test_equal_per_token_timesteps_are_the_scalar_model(self):
        t = np.array([999.0, 412.0])
        scalar = wr.forward(self.cfg, self.W, self.x, t, self.ctx)
        per_tok = wr.forward(self.cfg, self.W, self.x, np.repeat(t[:, None], self.L, axis=1), self.ctx)
        np.testing.assert_array_equal(per_tok, scalar)
        with self.assertRaises(ValueError):
            wr.forward(self.cfg, self.W, self.x, np.zeros((2, self.L - 1)), self.ctx)

    def test_modulation_is_per_token(self):
        # With both attention outputs zeroed the network is token-local, so each token of the per-token run
        # must equal the scalar run at that token's own timestep (block modulation, gates and head).
        W = dict(self.W)
        for i in range(self.cfg.num_layers):
            for a in ("attn1", "attn2"):
                for p in ("weight", "bias"):
                    W[f"blocks.{i}.{a}.to_out.0.{p}"] = np.zeros_like(W[f"blocks.{i}.{a}.to_out.0.{p}"])
        M = sr.ti2v_first_frame_mask(3, 4, 6)
        tt = sr.ti2v_token_timesteps(M, 800)
        got = wr.forward(self.cfg, W, self.x[:1], tt[None], self.ctx[:1])
        at0 = wr.forward(self.cfg, W, self.x[:1], [0.0], self.ctx[:1])
        at_t = wr.forward(self.cfg, W, self.x[:1], [800.0], self.ctx[:1])
        np.testing.assert_allclose(got[:, :, :1], at0[:, :, :1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[:, :, 1:], at_t[:, :, 1:], rtol=1e-12, atol=1e-12)
        self.assertGreater(np.abs(at0[:, :, :1] - at_t[:, :, :1]).max(), 1e-6)
        # With attention on, frame-0 timestep 0 changes the other frames too (through attention).
        full = wr.forward(self.cfg, self.W, self.x[:1], tt[None], self.ctx[:1])
        self.assertGreater(np.abs(full - wr.forward(self.cfg, self.W, self.x[:1], [800.0], self.ctx[:1])
                                  )[:, :, 1:].max(), 1e-6)

    def test_first_frame_conditioning_variants_agree(self):
        rng = np.random.default_rng(10)
        z = rng.standard_normal((48, 1, 4, 6))
        M = sr.ti2v_first_frame_mask(3, 4, 6)
        cond = self.ctx[0]
        seen = []

        def f(x, t, ctx, img):
            seen.append((x[0, :, 0].copy(), np.asarray(t).copy()))
            return wr.forward(self.cfg, self.W, x, t, ctx)
        model = sr.pipeline_model([f], cond, None, 3.0, first_frame=(z, M))
        x1 = rng.standard_normal((48, 3, 4, 6))
        for sched in ("unipc", "euler"):
            seen.clear()
            a = sr.ti2v_sample(sched, model, x1, 4, 5.0, z, M, "diffusers")
            for x0, t in seen:  # the model always sees z on frame 0 and t = 0 on its tokens
                np.testing.assert_array_equal(x0, z[:, 0])
                self.assertTrue(np.all(t[:, :6] == 0) and np.all(t[:, 6:] > 0))
            b = sr.ti2v_sample(sched, model, x1, 4, 5.0, z, M, "original")
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a[:, :1], z)
            plain = sr.sample(sched, model, x1, 4, 5.0)  # without the final replacement frame 0 is not z
            self.assertGreater(np.abs(plain[:, :1] - z).max(), 1e-6)


def _lora_tensors(cfg, rank, seed, modules, zero_up=False):
    rng = np.random.default_rng(seed)
    shp = wr.expected_shapes(cfg)
    out = {}
    for m in modules:
        o, i = shp[m + ".weight"]
        out[m] = (0.3 * rng.standard_normal((rank, i)),
                  np.zeros((o, rank)) if zero_up else 0.3 * rng.standard_normal((o, rank)))
    return out


class LoraTest(unittest.TestCase):
    def setUp(self):
        self.cfg = wr.parse_config(I2V)
        self.W = random_state(self.cfg, 11)
        rng = np.random.default_rng(12)
        self.x = rng.standard_normal((1, 36, 2, 4, 4))
        self.ctx = rng.standard_normal((1, 5, 32))
        self.img = rng.standard_normal((1, 7, 24))
        self.mods = ["blocks.0.attn1.to_q", "blocks.1.attn1.to_out.0", "blocks.0.attn2.to_k",
                     "blocks.1.attn2.add_v_proj", "blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.2",
                     "condition_embedder.time_proj", "proj_out", "condition_embedder.time_embedder.linear_1",
                     "condition_embedder.image_embedder.ff.net.2", "condition_embedder.text_embedder.linear_2"]

    def fwd(self, W, lora=None):
        return wr.forward(self.cfg, W, self.x, [650], self.ctx, image_embeds=self.img, lora=lora)

    def diffusers_file(self, mats, alpha=None):
        t = {}
        for m, (A, B) in mats.items():
            t[f"transformer.{m}.lora_A.weight"] = A
            t[f"transformer.{m}.lora_B.weight"] = B
        meta = {} if alpha is None else {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha,
                                                                              "transformer.r": 4})}
        return t, meta

    def original_file(self, mats, alpha, kohya=False):
        t = {}
        for m, (A, B) in mats.items():
            o = lr._diffusers_to_original(m)
            key = "lora_unet_" + o.replace(".", "_") if kohya else "diffusion_model." + o
            t[key + ".lora_down.weight"] = A
            t[key + ".lora_up.weight"] = B
            t[key + ".alpha"] = np.array(alpha)
        return t

    def test_zero_up_is_bit_identical(self):
        mats = _lora_tensors(self.cfg, 4, 1, self.mods, zero_up=True)
        p = lr.parse_lora(*self.diffusers_file(mats, 8.0), self.cfg)
        base = self.fwd(self.W)
        np.testing.assert_array_equal(self.fwd(self.W, lr.as_forward_lora([(p, 1.7)])), base)
        np.testing.assert_array_equal(self.fwd(lr.merge(self.W, [(p, 1.7)])), base)

    def test_unmerged_equals_merged_and_formula(self):
        mats = _lora_tensors(self.cfg, 4, 2, self.mods)
        p = lr.parse_lora(*self.diffusers_file(mats, 8.0), self.cfg)
        mats2 = _lora_tensors(self.cfg, 2, 3, self.mods[:3])
        p2 = lr.parse_lora(*self.diffusers_file(mats2), self.cfg)  # no metadata: alpha = rank
        req = [(p, 0.8), (p2, -0.5)]
        merged = lr.merge(self.W, req)
        A, B = mats["blocks.0.attn1.to_q"]
        A2, B2 = mats2["blocks.0.attn1.to_q"]
        np.testing.assert_allclose(merged["blocks.0.attn1.to_q.weight"],
                                   self.W["blocks.0.attn1.to_q.weight"] + 0.8 * (8.0 / 4) * B @ A
                                   - 0.5 * (2 / 2) * B2 @ A2, rtol=1e-14, atol=1e-14)
        a = self.fwd(merged)
        b = self.fwd(self.W, lr.as_forward_lora(req))
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        self.assertGreater(np.abs(a - self.fwd(self.W)).max(), 1e-4)
        np.testing.assert_array_equal(self.W["blocks.0.attn1.to_q.weight"],
                                      random_state(self.cfg, 11)["blocks.0.attn1.to_q.weight"])  # not modified
        np.testing.assert_array_equal(self.fwd(self.W, lr.as_forward_lora([(p, 0.0)])), self.fwd(self.W))

    def test_formats_agree(self):
        mats = _lora_tensors(self.cfg, 4, 4, self.mods)
        p_diff = lr.parse_lora(*self.diffusers_file(mats, 6.0), self.cfg)
        p_orig = lr.parse_lora(self.original_file(mats, 6.0), {}, self.cfg)
        p_kohya = lr.parse_lora(self.original_file(mats, 6.0, kohya=True), {}, self.cfg)
        self.assertEqual(set(p_diff), set(self.mods))
        for other in (p_orig, p_kohya):
            self.assertEqual(set(other), set(p_diff))
            for m in p_diff:
                np.testing.assert_array_equal(other[m].down, p_diff[m].down)
                np.testing.assert_array_equal(other[m].up, p_diff[m].up)
                self.assertEqual(other[m].alpha, 6.0)
        self.assertEqual(lr.parse_lora(*self.diffusers_file(mats), self.cfg)["proj_out"].alpha, 4.0)
        # original names without the prefix and with lora_A/lora_B also map
        t = {"blocks.1.cross_attn.v_img.lora_A.weight": mats["blocks.1.attn2.add_v_proj"][0],
             "blocks.1.cross_attn.v_img.lora_B.weight": mats["blocks.1.attn2.add_v_proj"][1],
             "blocks.0.ffn.0.lora_A.weight": mats["blocks.0.ffn.net.0.proj"][0],
             "blocks.0.ffn.0.lora_B.weight": mats["blocks.0.ffn.net.0.proj"][1],
             "blocks.0.ffn.0.diff_b": np.ones(48)}
        p = lr.parse_lora(t, {}, self.cfg)
        self.assertEqual(set(p), {"blocks.1.attn2.add_v_proj", "blocks.0.ffn.net.0.proj"})
        merged = lr.merge(self.W, [(p, 2.0)])
        np.testing.assert_array_equal(merged["blocks.0.ffn.net.0.proj.bias"], self.W["blocks.0.ffn.net.0.proj.bias"] + 2.0)

    def test_bad_files_name_the_tensor(self):
        mats = _lora_tensors(self.cfg, 4, 5, self.mods[:2])
        t, meta = self.diffusers_file(mats)
        bad = dict(t)
        bad["transformer.blocks.0.attn1.to_q.lora_B.weight"] = np.zeros((31, 4))
        with self.assertRaisesRegex(lr.LoraError, r"f\.safetensors: tensor transformer\.blocks\.0\.attn1\.to_q\.lora_B"):
            lr.parse_lora(bad, meta, self.cfg, "f.safetensors")
        bad = dict(t)
        bad["transformer.blocks.0.attn1.to_q.lora_A.weight"] = np.zeros((4, 31))
        with self.assertRaisesRegex(lr.LoraError, "to_q.lora_A"):
            lr.parse_lora(bad, meta, self.cfg)
        bad = dict(t)
        bad["transformer.blocks.7.attn1.to_q.lora_A.weight"] = np.zeros((4, 32))
        with self.assertRaisesRegex(lr.LoraError, "blocks.7.attn1.to_q"):
            lr.parse_lora(bad, meta, self.cfg)
        bad = {k: v for k, v in t.items() if not k.endswith("to_out.0.lora_B.weight")}
        with self.assertRaisesRegex(lr.LoraError, "up matrix missing"):
            lr.parse_lora(bad, meta, self.cfg)
        bad = dict(t)
        bad["transformer.blocks.0.attn1.to_q.lora_A.weight"] = np.full((4, 32), np.nan)
        with self.assertRaisesRegex(lr.LoraError, "non-finite"):
            lr.parse_lora(bad, meta, self.cfg)
        with self.assertRaisesRegex(lr.LoraError, "lora_adapter_metadata"):
            lr.parse_lora(t, {"lora_adapter_metadata": "{not json"}, self.cfg)
        with self.assertRaisesRegex(lr.LoraError, "no Linear"):  # T2V model has no add_v_proj
            lr.parse_lora(self.diffusers_file(_lora_tensors(self.cfg, 2, 6, ["blocks.1.attn2.add_v_proj"]))[0], {},
                          wr.parse_config(BASE))

    def test_file_roundtrip(self):
        mats = _lora_tensors(self.cfg, 4, 7, self.mods[:3])
        t, meta = self.diffusers_file(mats, 2.0)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "l.safetensors")
            st.save_file(t, path, dtype="F32", metadata=meta)
            p = lr.parse_lora(st.load_file(path), meta, self.cfg)
        self.assertEqual(p["blocks.0.attn1.to_q"].alpha, 2.0)
        np.testing.assert_allclose(p["blocks.0.attn1.to_q"].down, mats["blocks.0.attn1.to_q"][0], rtol=1e-6)


if __name__ == "__main__":
    unittest.main()

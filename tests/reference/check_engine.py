#!/usr/bin/env python3
"""Compares the C++ engine (`denoised run --backend cpu`) against the float64 NumPy reference.

Usage: check_engine.py --bin path/to/denoised [--workdir DIR] [--keep]

It makes tiny checkpoints with `denoised make-checkpoint` (f32, bf16, f16, and f32 with original Wan2.1
tensor names, all from one seed), checks their tensors against the spec (§2 names/shapes; bf16/f16 =
rounded f32; original names = same tensors), writes seeded embeddings/latents, runs the engine for a
set of cases and compares its final latents with the reference run on the same checkpoint file.

Tolerance (stated bound): relative L2 error ||engine - ref|| / ||ref|| < 1e-4 for every case. The
engine computes in fp32 and the reference in float64. Measured on the CPU backend: ~1.3e-7 for the
single-step forward cases, up to ~8e-6 for UniPC with CFG, almost all of it from sigma_0 = 1 - 1e-6
being stored in float32 (alpha_0 = 1 - sigma_0 moves by 1.3%; the "[f32-sigma ref]" column re-runs the
reference with float32 sigma storage, as diffusers does, and drops to ~5e-7). 1e-4 leaves margin while
still catching real mismatches: zero-padding the text to 512 tokens moves the result by ~7e-2, feeding
UniPC a float instead of a truncated timestep by ~3e-1.
Exits non-zero on any failure; prints one summary line per case.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_np as st  # noqa: E402
import samplers_ref as sr  # noqa: E402
import lora_ref as lr  # noqa: E402
import wan_ref as wr  # noqa: E402

REL_L2_BOUND = 1e-4          # engine (fp32) vs reference (float64), per case
RANKS_VS_SINGLE_BOUND = 1e-5  # engine --ranks 2 vs engine --ranks 1 (both fp32)
SEED = 1234
FRAMES, HEIGHT, WIDTH = 9, 32, 48   # latent [16, 3, 4, 6] -> grid 3x2x3, 18 tokens
TEXT_LEN = 24
TINY_EXPECT = {"num_layers": 2, "num_heads": 4, "head_dim": 16, "in_channels": 16, "out_channels": 16,
               "text_dim": 32, "ffn_dim": 128, "freq_dim": 256, "patch_size": (1, 2, 2),
               "vae_stride": (4, 8, 8), "eps": 1e-6}


class Failure(Exception):
    pass


def run_cmd(args, timeout):
    t0 = time.time()
    try:
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        raise Failure(f"timed out after {timeout}s: {' '.join(args)}\n{out[-3000:]}")
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        raise Failure(f"exit code {p.returncode}: {' '.join(args)}\n{out[-3000:]}")
    return out, time.time() - t0


def rel_l2(a, r):
    return float(np.linalg.norm((a - r).ravel()) / max(np.linalg.norm(r.ravel()), 1e-300))


# ------------------------------------------------------------------------------------- checkpoints
def make_checkpoints(binary, work, timeout):
    variants = {"f32": ["--dtype", "f32"], "bf16": ["--dtype", "bf16"], "f16": ["--dtype", "f16"],
                "orig": ["--dtype", "f32", "--original-names"],
                "shard": ["--dtype", "f32", "--max-shard-bytes", "65536"]}
    dirs = {}
    for name, extra in variants.items():
        d = os.path.join(work, "ck_" + name)
        run_cmd([binary, "make-checkpoint", "--preset", "tiny", "--seed", str(SEED), "--out", d] + extra, timeout)
        dirs[name] = d
    return dirs


def raw_weights(d):
    return wr.to_diffusers_names(st.load_model_dir(d))


def check_checkpoints(dirs):
    """Spec checks of the written files; returns {variant: (cfg, float64 weights)}."""
    models = {}
    for name, d in dirs.items():
        cfg, W = wr.load_model(d)  # raises on missing/mis-shaped tensors
        for k, v in TINY_EXPECT.items():
            got = getattr(cfg, k)
            if (abs(got - v) > 1e-12 if isinstance(v, float) else got != v):
                raise Failure(f"checkpoint {name}: config {k} = {got}, tiny preset says {v}")
        models[name] = (cfg, W)
    names = set(st.load_model_dir(dirs["orig"]))
    if not wr.is_original_layout(names):
        raise Failure("checkpoint orig: --original-names wrote diffusers names")
    if wr.is_original_layout(set(st.load_model_dir(dirs["f32"]))):
        raise Failure("checkpoint f32: default layout uses original names")
    ref = raw_weights(dirs["f32"])
    index = os.path.join(dirs["shard"], "diffusion_pytorch_model.safetensors.index.json")
    if not os.path.exists(index):
        raise Failure("checkpoint shard: --max-shard-bytes 65536 wrote no diffusion_pytorch_model.safetensors.index.json")
    shard = raw_weights(dirs["shard"])
    if set(shard) != set(ref) or any(not np.array_equal(shard[n], ref[n]) for n in ref):
        raise Failure("checkpoint shard: sharded tensors differ from the single-file f32 checkpoint")
    n_shards = len({v for v in json.load(open(index))["weight_map"].values()})
    for name, want in (("bf16", "BF16"), ("f16", "F16"), ("orig", "F32"), ("f32", "F32"), ("shard", "F32")):
        files = [os.path.join(dirs[name], f) for f in os.listdir(dirs[name]) if f.endswith(".safetensors")]
        dts = set()
        for f in files:
            dts |= set(st.tensor_dtypes(f).values())
        if dts != {want}:
            raise Failure(f"checkpoint {name}: tensor dtypes {sorted(dts)}, expected {want}")
    stds = [float(np.std(a)) for a in ref.values()]
    got_bf16, got_f16, got_orig = raw_weights(dirs["bf16"]), raw_weights(dirs["f16"]), raw_weights(dirs["orig"])
    # bf16/f16 must be the f32 weights rounded: at most 1 unit in the last place away from the
    # round-to-nearest-even conversion (exact RNE is reported, not required).
    ulps = {"bf16": 0, "f16": 0}
    for n, a in ref.items():
        a = a.astype(np.float32)
        if not np.array_equal(got_orig[n].astype(np.float32), a):
            raise Failure(f"checkpoint orig: tensor {n} differs from the f32 checkpoint (same seed)")
        rne_b = st.f32_to_bf16_bits(a).astype(np.int64)
        got_b = st.f32_to_bf16_bits(got_bf16[n].astype(np.float32)).astype(np.int64)  # exact: already bf16
        rne_h = a.astype(np.float16).view(np.uint16).astype(np.int64)
        got_h = got_f16[n].astype(np.float16).view(np.uint16).astype(np.int64)
        for key, g_, r_ in (("bf16", got_b, rne_b), ("f16", got_h, rne_h)):
            if g_.size:
                ulps[key] = max(ulps[key], int(np.abs(g_ - r_).max()))
    if ulps["bf16"] > 1 or ulps["f16"] > 1:
        raise Failure(f"checkpoint bf16/f16 are not the f32 weights rounded (max ulps from RNE: {ulps})")
    if max(stds) == 0.0:
        raise Failure("checkpoint f32: all weights are constant")
    print(f"checkpoints ok: {len(ref)} tensors, names/shapes per spec, orig == f32, {n_shards} shards == f32, "
          f"bf16/f16 = rounded f32 (max ulps from round-to-nearest-even: bf16 {ulps['bf16']}, f16 {ulps['f16']})")
    return models


# ------------------------------------------------------------------------------------------ inputs
def write_inputs(work, cfg):
    rng = np.random.default_rng(SEED)
    lat = rng.standard_normal(cfg.latent_shape(FRAMES, HEIGHT, WIDTH)).astype(np.float32)
    emb = rng.standard_normal((TEXT_LEN, cfg.text_dim)).astype(np.float32)
    neg = rng.standard_normal((TEXT_LEN, cfg.text_dim)).astype(np.float32)
    paths = {k: os.path.join(work, k + ".safetensors") for k in ("latents", "embeds", "neg")}
    st.save_file({"latents": lat}, paths["latents"])
    st.save_file({"prompt_embeds": emb}, paths["embeds"])
    st.save_file({"prompt_embeds": neg}, paths["neg"])
    return paths, lat.astype(np.float64), emb.astype(np.float64), neg.astype(np.float64)


def check_timestep_margins(scheduler, steps, shift):
    """UniPC truncates sigma*1000: keep cases away from integer boundaries (fp32 vs f64 ambiguity)."""
    if scheduler != "unipc":
        return
    sig, _ = sr.unipc_schedule(steps, shift)
    raw = sig[:-1] * 1000.0
    frac = raw - np.floor(raw)
    if np.any(np.minimum(frac, 1 - frac) < 2e-4):
        raise Failure(f"case setup: unipc steps={steps} shift={shift} has sigma*1000 within 2e-4 of an integer")


def reference(cfg, W, lat, emb, neg, scheduler, steps, shift, guidance, text_pad=None, t_mode=None,
              fp32_sigmas=False):
    def fwd(x, t, ctx):
        if text_pad:
            ctx = np.concatenate([ctx, np.zeros((ctx.shape[0], text_pad - ctx.shape[1], ctx.shape[2]))], axis=1)
        return wr.forward(cfg, W, x, t, ctx)
    sig, t = sr.make_schedule(scheduler, steps, shift, fp32_sigmas)
    if t_mode == "float":
        t = sig[:-1] * 1000.0
    elif t_mode == "int":
        t = np.floor(sig[:-1] * 1000.0)
    model = sr.guided_model(fwd, emb, neg, guidance)
    if scheduler == "unipc":
        return sr.unipc_sample(model, lat, sig, t)
    return sr.euler_sample(model, lat, sig, t)


# ------------------------------------------------------------------------------------------- cases
CASES = [
    # name, checkpoint, scheduler, steps, guidance, shift, negative?, ranks
    ("a_forward_euler1_g1", "f32", "euler", 1, 1.0, 3.0, False, 1),
    ("b_unipc4_cfg4.5", "f32", "unipc", 4, 4.5, 3.0, True, 1),
    ("b2_unipc3_cfg4.5_noneg", "f32", "unipc", 3, 4.5, 3.0, False, 1),
    ("c_euler3_shift5", "f32", "euler", 3, 1.0, 5.0, False, 1),
    ("d_bf16_unipc2_cfg4.5", "bf16", "unipc", 2, 4.5, 5.0, True, 1),
    ("d_f16_euler2_cfg2", "f16", "euler", 2, 2.0, 3.0, True, 1),
    ("d_orignames_euler1_g1", "orig", "euler", 1, 1.0, 3.0, False, 1),
    ("d_sharded_unipc2_g1", "shard", "unipc", 2, 1.0, 3.0, False, 1),
    ("e_ranks2_unipc4_cfg4.5", "f32", "unipc", 4, 4.5, 3.0, True, 2),
    ("e2_ranks2_euler1_g1", "f32", "euler", 1, 1.0, 3.0, False, 2),
]
SINGLE_RANK_TWIN = {"e_ranks2_unipc4_cfg4.5": "b_unipc4_cfg4.5", "e2_ranks2_euler1_g1": "a_forward_euler1_g1"}


# ------------------------------------------------------------------- two experts (Wan2.2 A14B, MODELS.md §3)
A14B_BOUNDARY = 0.875
A14B_CASES = [
    # name, checkpoint, scheduler, steps, guidance, guidance_2 (None = unset), shift, ranks
    ("x_a14b_unipc6_g4_g2_3", "a14b", "unipc", 6, 4.0, 3.0, 5.0, (1, 2, 4)),
    ("x_a14b_euler5_g1_shift12", "a14b", "euler", 5, 1.0, None, 12.0, (1,)),
    ("x_a14b_orignames_unipc4_g4", "a14b_orig", "unipc", 4, 4.0, None, 3.0, (1,)),
    # Wan2.2-I2V-A14B: 36 input channels (latent 16 | mask 4 | image latent 16), boundary 0.9
    ("x_i2v_a14b_unipc5_g3.5_g2_2", "i2v", "unipc", 5, 3.5, 2.0, 5.0, (1, 2, 4)),
]
BOUNDARIES = {"a14b": 0.875, "a14b_orig": 0.875, "i2v": 0.9}


def make_two_expert_checkpoints(binary, work, timeout):
    dirs = {}
    for name, preset, extra in (("a14b", "tiny-t2v-a14b", []), ("a14b_orig", "tiny-t2v-a14b", ["--original-names"]),
                                ("i2v", "tiny-i2v-a14b", [])):
        d = os.path.join(work, "ck_" + name)
        run_cmd([binary, "make-checkpoint", "--preset", preset, "--seed", str(SEED), "--out", d,
                 "--dtype", "f32"] + extra, timeout)
        dirs[name] = d
    return dirs


def load_two_experts(d):
    """(cfg, W_high, W_low, boundary) of a pipeline folder, diffusers or original layout."""
    if os.path.isdir(os.path.join(d, "transformer_2")):
        idx = json.load(open(os.path.join(d, "model_index.json")))
        boundary = idx.get("boundary_ratio")
        sub = ("transformer", "transformer_2")
    else:
        boundary = A14B_BOUNDARY  # the original layout carries no boundary (Wan2.2 T2V config: 0.875)
        sub = ("high_noise_model", "low_noise_model")
    cfg_h, W_h = wr.load_model(os.path.join(d, sub[0]))
    cfg_l, W_l = wr.load_model(os.path.join(d, sub[1]))
    if cfg_h != cfg_l:
        raise Failure(f"{d}: the two experts have different configs")
    return cfg_h, W_h, W_l, boundary


def check_two_expert_checkpoints(dirs):
    models = {name: load_two_experts(d) for name, d in dirs.items()}
    for name, (c, _, _, b) in models.items():
        if b != BOUNDARIES[name]:
            raise Failure(f"{name}: model_index.json boundary_ratio {b}, expected {BOUNDARIES[name]}")
    if models["i2v"][0].in_channels != 36 or models["i2v"][0].out_channels != 16:
        raise Failure("tiny-i2v-a14b: expected 36 input and 16 output channels")
    cfg, W_h, W_l, boundary = models["a14b"]
    if all(np.array_equal(W_h[n], W_l[n]) for n in W_h):
        raise Failure("the two experts have identical weights: the expert switch would be untestable")
    _, O_h, O_l, _ = models["a14b_orig"]
    for n in W_h:
        if not (np.array_equal(W_h[n], O_h[n]) and np.array_equal(W_l[n], O_l[n])):
            raise Failure(f"original-names two-expert checkpoint: tensor {n} differs from the diffusers one")
    print(f"two-expert checkpoints ok: transformer/ + transformer_2/ (diffusers) and high_noise_model/ + "
          f"low_noise_model/ (original) hold the same weights, boundary_ratio {boundary}")
    return models


def reference_two_experts(cfg, W_h, W_l, boundary, lat, emb, neg, scheduler, steps, shift, g, g2, trace=None,
                          condition=None):
    def expert(W):
        return lambda x, t, ctx, img: wr.forward(cfg, W, x, t, ctx)
    sig, t = sr.make_schedule(scheduler, steps, shift)
    model = sr.pipeline_model([expert(W_h), expert(W_l)], emb, neg, g, guidance_2=g2, boundary_ratio=boundary,
                              trace=trace, condition=condition)
    if scheduler == "unipc":
        return sr.unipc_sample(model, lat, sig, t)
    return sr.euler_sample(model, lat, sig, t)


def run_i2v14b_cases(binary, work, timeout, only, paths, lat, emb, neg, failures):
    """Wan2.1-I2V-14B shape (tiny-i2v-14b): CLIP image tokens through the image embedder, a second softmax
    over them in every cross-attention, and the 36-channel input (MODELS.md §4)."""
    if only and not any(p.startswith("i_") or "i_".startswith(p) for p in only.split(",")):
        return
    try:
        dirs = {}
        for name, extra in (("i2v14", []), ("i2v14_orig", ["--original-names"])):
            d = os.path.join(work, "ck_" + name)
            run_cmd([binary, "make-checkpoint", "--preset", "tiny-i2v-14b", "--seed", str(SEED), "--out", d,
                     "--dtype", "f32"] + extra, timeout)
            dirs[name] = d
        cfg, W = wr.load_model(dirs["i2v14"])
        _, W_o = wr.load_model(dirs["i2v14_orig"])
        if set(W) != set(W_o) or any(not np.array_equal(W[n], W_o[n]) for n in W):
            raise Failure("tiny-i2v-14b: original-names checkpoint differs from the diffusers one")
        if cfg.image_dim != 24 or cfg.in_channels != 36:
            raise Failure(f"tiny-i2v-14b: image_dim {cfg.image_dim}, in_channels {cfg.in_channels}")
        rng = np.random.default_rng(SEED + 9)
        F_, H_, W_ = lat.shape[1:]
        img = rng.standard_normal((11, cfg.image_dim)).astype(np.float32)
        cond = sr.i2v_condition(sr.i2v_mask(FRAMES, H_, W_), rng.standard_normal((16, F_, H_, W_)))
        cond = cond.astype(np.float32)
        ipath, cpath = os.path.join(work, "i_image.safetensors"), os.path.join(work, "i_cond.safetensors")
        st.save_file({"image_embeds": img}, ipath)
        st.save_file({"condition_latents": cond}, cpath)
        sched, steps, g, shift = "unipc", 3, 5.0, 3.0
        sig, t = sr.make_schedule(sched, steps, shift)

        def ref_with(image):
            f = lambda x, tt, ctx, im: wr.forward(cfg, W, x, tt, ctx, image_embeds=im)  # noqa: E731
            model = sr.pipeline_model([f], emb, neg, g, image_embeds=image, condition=cond.astype(np.float64))
            return sr.unipc_sample(model, lat, sig, t)
        ref = ref_with(img.astype(np.float64))
        sens = {"other image": rel_l2(ref_with(rng.standard_normal(img.shape)), ref),
                "zero image": rel_l2(ref_with(np.zeros(img.shape)), ref)}
        if min(sens.values()) < 100 * REL_L2_BOUND:
            raise Failure(f"case setup: image readings too close: {sens}")
        outs = {}
        for ck, ranks in (("i2v14", 1), ("i2v14", 2), ("i2v14", 4), ("i2v14_orig", 1)):
            got, secs = run_engine(binary, dirs[ck], work, "i_" + ck, paths, sched, steps, g, shift, ranks,
                                   ["--image-embeds", ipath, "--condition", cpath], timeout)
            err = rel_l2(got, ref)
            same = ranks == 1 or np.array_equal(got, outs[1])
            outs.setdefault(ranks, got)
            ok = err < REL_L2_BOUND and same
            print(f"{'ok  ' if ok else 'FAIL'} i_wan21_i2v_unipc3_cfg5 ckpt={ck:10s} ranks={ranks} rel_l2={err:.3e} "
                  f"(bound {REL_L2_BOUND:g}) engine {secs:.1f}s" + ("" if ranks == 1 else f" bitwise == ranks 1: {same}")
                  + " [guards: " + ", ".join(f"{k} {v:.1e}" for k, v in sens.items()) + "]", flush=True)
            if not ok:
                failures.append("i_wan21_i2v")
        # Validation: the I2V model without image_embeds, a T2V model with them.
        for label, model, extra in (("i2v without image_embeds", dirs["i2v14"], ["--condition", cpath]),
                                    ("t2v with image_embeds", os.path.join(work, "ck_f32"), ["--image-embeds", ipath])):
            p = subprocess.run([binary, "run", "--model", model, "--frames", str(FRAMES), "--height", str(HEIGHT),
                                "--width", str(WIDTH), "--steps", "1", "--out", os.path.join(work, "i_bad.out")]
                               + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
            last = (p.stdout.decode(errors="replace").strip().splitlines() or [""])[-1]
            ok = p.returncode != 0 and "INVALID_ARGUMENT" in last and "image_embeds" in last
            print(f"{'ok  ' if ok else 'FAIL'} i_bad {label:30s} -> {last[:160]}", flush=True)
            if not ok:
                failures.append("i_bad " + label)
    except (Failure, ValueError, OSError, KeyError) as e:
        failures.append("i_wan21_i2v")
        print(f"FAIL i_wan21_i2v: {e}", flush=True)


def check_condition_validation(binary, work, timeout, paths, failures):
    """An I2V model without condition_latents, and a T2V model given one, are INVALID_ARGUMENT naming it."""
    cpath = os.path.join(work, "x_i2v_a14b_unipc5_g3.5_g2_2.condition.safetensors")
    for label, ck, extra in (("i2v without condition", "i2v", []), ("t2v with condition", "a14b", ["--condition", cpath]),
                             ("t2v with guidance-2 on one transformer", None, ["--guidance-2", "2"])):
        model = os.path.join(work, "ck_" + ck) if ck else os.path.join(work, "ck_f32")
        out_path = os.path.join(work, "x_bad.out.safetensors")
        p = subprocess.run([binary, "run", "--model", model, "--frames", str(FRAMES), "--height", str(HEIGHT),
                            "--width", str(WIDTH), "--steps", "1", "--out", out_path] + extra,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        last = (p.stdout.decode(errors="replace").strip().splitlines() or [""])[-1]
        field = "guidance_scale_2" if ck is None else "condition_latents"
        ok = p.returncode != 0 and "INVALID_ARGUMENT" in last and field in last
        print(f"{'ok  ' if ok else 'FAIL'} x_bad {label:40s} -> {last[:160]}", flush=True)
        if not ok:
            failures.append("x_bad " + label)


def run_two_expert_cases(binary, work, timeout, only, paths, lat, emb, neg, failures):
    try:
        models = check_two_expert_checkpoints(make_two_expert_checkpoints(binary, work, timeout))
    except (Failure, ValueError, OSError) as e:
        print(f"FAIL two-expert checkpoints: {e}", flush=True)
        failures.append("two-expert checkpoints")
        return
    for name, ck, sched, steps, g, g2, shift, ranks_list in A14B_CASES:
        if only and not any(name.startswith(p) for p in only.split(",")):
            continue
        try:
            check_timestep_margins(sched, steps, shift)
            cfg, W_h, W_l, boundary = models[ck]
            _, t = sr.make_schedule(sched, steps, shift)
            k = sr.expert_steps(t, boundary)
            if not 0 < k < steps:
                raise Failure(f"case setup: the expert does not switch ({k} of {steps} steps high-noise)")
            trace = []
            cond, cond_args = None, []
            if cfg.in_channels > cfg.out_channels:  # I2V: mask 4 | image latent 16 (MODELS.md §4)
                F_, H_, W_ = lat.shape[1:]
                image_latent = np.random.default_rng(SEED + 5).standard_normal((16, F_, H_, W_))
                cond = sr.i2v_condition(sr.i2v_mask(FRAMES, H_, W_), image_latent)
                cpath = os.path.join(work, name + ".condition.safetensors")
                st.save_file({"condition_latents": cond.astype(np.float32)}, cpath)
                cond = cond.astype(np.float32).astype(np.float64)
                cond_args = ["--condition", cpath]
            ref = reference_two_experts(cfg, W_h, W_l, boundary, lat, emb, neg, sched, steps, shift, g, g2, trace,
                                        condition=cond)
            # Guards against a vacuous comparison: each expert alone, and the wrong low-noise scale,
            # must be far from the two-expert result.
            alone_h = reference_two_experts(cfg, W_h, W_h, boundary, lat, emb, neg, sched, steps, shift, g, g2,
                                            condition=cond)
            alone_l = reference_two_experts(cfg, W_l, W_l, boundary, lat, emb, neg, sched, steps, shift, g, g2,
                                            condition=cond)
            sens = {"high-only": rel_l2(alone_h, ref), "low-only": rel_l2(alone_l, ref)}
            if g2 is not None and g2 != g and g > 1:
                sens["g2=g"] = rel_l2(reference_two_experts(cfg, W_h, W_l, boundary, lat, emb, neg, sched, steps,
                                                            shift, g, None, condition=cond), ref)
            if cond is not None:  # the channel order matters: mask and image latent swapped
                swapped = np.concatenate([cond[4:], cond[:4]], axis=0)
                sens["cond order swapped"] = rel_l2(reference_two_experts(
                    cfg, W_h, W_l, boundary, lat, emb, neg, sched, steps, shift, g, g2, condition=swapped), ref)
            if min(sens.values()) < 100 * REL_L2_BOUND:
                raise Failure(f"case setup: alternative readings are too close to the reference: {sens}")
            outs = {}
            for ranks in ranks_list:
                out_path = os.path.join(work, f"{name}.r{ranks}.out.safetensors")
                cmd = [binary, "run", "--model", os.path.join(work, "ck_" + ck), "--ranks", str(ranks),
                       "--backend", "cpu", "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
                       "--steps", str(steps), "--guidance", repr(g), "--shift", repr(shift),
                       "--scheduler", sched, "--seed", str(SEED), "--embeds", paths["embeds"],
                       "--negative-embeds", paths["neg"], "--latents", paths["latents"], "--out", out_path]
                if g2 is not None:
                    cmd += ["--guidance-2", repr(g2)]
                cmd += cond_args
                _, secs = run_cmd(cmd, timeout)
                got = st.load_file(out_path)["latents"].astype(np.float64)
                if got.shape != lat.shape or not np.all(np.isfinite(got)):
                    raise Failure(f"output shape {got.shape} (expected {lat.shape}) or non-finite values")
                outs[ranks] = got
                err, mx = rel_l2(got, ref), float(np.abs(got - ref).max())
                extra = ""
                ok = err < REL_L2_BOUND
                if ranks != ranks_list[0]:
                    same = np.array_equal(got, outs[ranks_list[0]])
                    extra = f" bitwise == ranks {ranks_list[0]}: {same}"
                    ok = ok and same
                print(f"{'ok  ' if ok else 'FAIL'} {name:26s} ranks={ranks} ckpt={ck} high-noise steps {k}/{steps} "
                      f"max_abs={mx:.3e} rel_l2={err:.3e} (bound {REL_L2_BOUND:g}) engine {secs:.1f}s "
                      f"[alternatives: " + ", ".join(f"{a} {v:.1e}" for a, v in sens.items()) + "]" + extra,
                      flush=True)
                if not ok:
                    failures.append(name)
        except (Failure, ValueError, OSError, KeyError) as e:
            failures.append(name)
            print(f"FAIL {name}: {e}", flush=True)
    if not only or any("x_bad".startswith(p) or p.startswith("x_") for p in only.split(",")):
        check_condition_validation(binary, work, timeout, paths, failures)


# ------------------------------------------------------------------------ per-request LoRA (MODELS.md §6)
LORA_FILES = {"dif": ("diffusers", 7, 4, 2.0), "orig": ("original", 8, 3, 1.5), "koh": ("kohya", 9, 2, 0.0)}


def make_loras(binary, work, timeout, preset="tiny"):
    d = os.path.join(work, "loras_" + preset)
    os.makedirs(d, exist_ok=True)
    for name, (fmt, seed, rank, alpha) in LORA_FILES.items():
        cmd = [binary, "make-checkpoint", "--preset", preset, "--seed", str(seed), "--lora-out",
               os.path.join(d, name + ".safetensors"), "--lora-format", fmt, "--lora-rank", str(rank)]
        if alpha:
            cmd += ["--lora-alpha", repr(alpha)]
        run_cmd(cmd, timeout)
    return d


def parse_lora_file(path, cfg):
    header, _ = st.read_header(path)
    return lr.parse_lora(st.load_file(path), header.get("__metadata__", {}), cfg, source=path)


def run_engine(binary, model, work, name, paths, sched, steps, g, shift, ranks, extra, timeout):
    out_path = os.path.join(work, f"{name}.r{ranks}.out.safetensors")
    cmd = [binary, "run", "--model", model, "--ranks", str(ranks), "--backend", "cpu", "--frames", str(FRAMES),
           "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(steps), "--guidance", repr(g),
           "--shift", repr(shift), "--scheduler", sched, "--seed", str(SEED), "--embeds", paths["embeds"],
           "--negative-embeds", paths["neg"], "--latents", paths["latents"], "--out", out_path] + extra
    _, secs = run_cmd(cmd, timeout)
    got = st.load_file(out_path)["latents"].astype(np.float64)
    if not np.all(np.isfinite(got)):
        raise Failure("non-finite output")
    return got, secs


def run_lora_cases(binary, work, timeout, only, paths, lat, emb, neg, models, dirs, failures):
    if only and not any("l_".startswith(p) or p.startswith("l_") for p in only.split(",")):
        return
    try:
        ldir = make_loras(binary, work, timeout)
        cfg, W = models["f32"]
        parsed = {n: parse_lora_file(os.path.join(ldir, n + ".safetensors"), cfg) for n in LORA_FILES}
        request = [("dif", 0.8), ("orig", -0.6), ("koh", 1.3)]
        lora = lr.as_forward_lora([(parsed[n], s) for n, s in request])
        sched, steps, g, shift = "unipc", 3, 4.5, 3.0
        check_timestep_margins(sched, steps, shift)
        sig, t = sr.make_schedule(sched, steps, shift)

        def ref_with(lo):
            model = sr.guided_model(lambda x, tt, ctx: wr.forward(cfg, W, x, tt, ctx, lora=lo), emb, neg, g)
            return sr.unipc_sample(model, lat, sig, t)
        ref = ref_with(lora)
        base = ref_with(None)
        # Guards: each file matters (dropping one moves the result far beyond the bound).
        sens = {"no LoRA": rel_l2(base, ref)}
        for drop in LORA_FILES:
            sens["without " + drop] = rel_l2(ref_with(lr.as_forward_lora(
                [(parsed[n], s) for n, s in request if n != drop])), ref)
        if min(sens.values()) < 100 * REL_L2_BOUND:
            raise Failure(f"case setup: LoRA readings too close to the reference: {sens}")
        spec = ",".join(f"{n}:{s!r}" for n, s in request)
        outs = {}
        for ranks in (1, 2, 4):
            got, secs = run_engine(binary, dirs["f32"], work, "l_lora3", paths, sched, steps, g, shift, ranks,
                                   ["--lora-dir", ldir, "--lora", spec], timeout)
            outs[ranks] = got
            err = rel_l2(got, ref)
            ok = err < REL_L2_BOUND and (ranks == 1 or np.array_equal(got, outs[1]))
            print(f"{'ok  ' if ok else 'FAIL'} l_lora3_{spec:24s} ranks={ranks} rel_l2={err:.3e} "
                  f"(bound {REL_L2_BOUND:g}) engine {secs:.1f}s"
                  + ("" if ranks == 1 else f" bitwise == ranks 1: {np.array_equal(got, outs[1])}")
                  + " [guards: " + ", ".join(f"{k} {v:.1e}" for k, v in sens.items()) + "]", flush=True)
            if not ok:
                failures.append("l_lora3")
        # Bad files: the error names the file and the tensor; nothing is written.
        bad = {}
        good = st.load_file(os.path.join(ldir, "dif.safetensors"))
        k0 = sorted(k for k in good if k.endswith("lora_A.weight"))[0]
        shape_bad = dict(good)
        shape_bad[k0] = np.zeros((good[k0].shape[0], good[k0].shape[1] + 1), np.float32)
        st.save_file(shape_bad, os.path.join(ldir, "bad_shape.safetensors"))
        bad["bad_shape"] = ("INVALID_ARGUMENT", ["bad_shape.safetensors", k0])
        unknown = dict(good)
        unknown["transformer.blocks.99.attn1.to_q.lora_A.weight"] = good[k0]
        st.save_file(unknown, os.path.join(ldir, "bad_module.safetensors"))
        bad["bad_module"] = ("INVALID_ARGUMENT", ["bad_module.safetensors", "blocks.99.attn1.to_q"])
        raw = open(os.path.join(ldir, "orig.safetensors"), "rb").read()
        open(os.path.join(ldir, "truncated.safetensors"), "wb").write(raw[: len(raw) - 100])
        bad["truncated"] = ("INVALID_ARGUMENT", ["truncated.safetensors"])
        bad["missing"] = ("NOT_FOUND", ["missing"])
        for name, (code, needles) in bad.items():
            out_path = os.path.join(work, f"l_bad_{name}.out.safetensors")
            p = subprocess.run([binary, "run", "--model", dirs["f32"], "--frames", str(FRAMES), "--height",
                                str(HEIGHT), "--width", str(WIDTH), "--steps", "1", "--out", out_path,
                                "--lora-dir", ldir, "--lora", name], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=timeout)
            msg = p.stdout.decode(errors="replace").strip().splitlines()
            last = msg[-1] if msg else ""
            ok = p.returncode != 0 and code in last and all(n in last for n in needles) and \
                not os.path.exists(out_path)
            print(f"{'ok  ' if ok else 'FAIL'} l_bad_{name:20s} -> {last[:200]}", flush=True)
            if not ok:
                failures.append("l_bad_" + name)
    except (Failure, ValueError, OSError, KeyError, lr.LoraError) as e:
        failures.append("l_lora")
        print(f"FAIL l_lora: {e}", flush=True)


# ------------------------------------------------------------- Wan2.2 TI2V (MODELS.md §5): per-token timesteps
# (tag, frames, height, width, text-only run too). CPU shards are 64-row tiles (S = 64·k): at 18 tokens
# every token sits on rank 0 (frame 0 = 6 tokens); at 288 tokens (latent [48, 2, 24, 24], frame 0 = 144
# tokens) 4 ranks have S = 128, so frame 0 spans ranks 0 and 1 (rank 1: 16 tokens at t = 0, 112 at t) and
# rank 2 holds none of it; 2 ranks have S = 192 (rank 0: 144 at t = 0, 48 at t).
TI2V_SIZES = [("", 9, 64, 96, True), ("_wide", 5, 384, 384, False)]


def run_ti2v_cases(binary, work, timeout, only, failures):
    """tiny-ti2v (48 channels, VAE 4x16x16, expand_timesteps): with a first-frame condition z [48, 1, H, W]
    the model input's frame 0 is z at every step, frame 0's tokens get t = 0 (their own modulation rows),
    and the result's frame 0 is z; without one every token gets t, bit for bit the scalar model. Ranks 1,
    2 and 4 bitwise (TI2V_SIZES says where frame 0's tokens fall)."""
    if only and not any(p.startswith("t_") or "t_".startswith(p) for p in only.split(",")):
        return
    try:
        d = os.path.join(work, "ck_ti2v")
        run_cmd([binary, "make-checkpoint", "--preset", "tiny-ti2v", "--seed", str(SEED), "--out", d,
                 "--dtype", "f32"], timeout)
        cfg, W = wr.load_model(d)
        if cfg.in_channels != 48 or cfg.out_channels != 48 or tuple(cfg.vae_stride) != (4, 16, 16):
            raise Failure(f"tiny-ti2v: channels {cfg.in_channels}/{cfg.out_channels}, vae_stride {cfg.vae_stride}")
        with open(os.path.join(d, "config.json")) as f:
            conf = json.load(f)
        if conf.get("expand_timesteps") is not True:
            raise Failure("tiny-ti2v: config.json lacks expand_timesteps: true")
        # The same weights as a plain (scalar-timestep) model: expand_timesteps false.
        d_plain = os.path.join(work, "ck_ti2v_plain")
        shutil.rmtree(d_plain, ignore_errors=True)
        shutil.copytree(d, d_plain)
        conf["expand_timesteps"] = False
        with open(os.path.join(d_plain, "config.json"), "w") as f:
            json.dump(conf, f)
    except (Failure, ValueError, OSError, KeyError) as e:
        failures.append("t_ti2v")
        print(f"FAIL t_ti2v: {e}", flush=True)
        return
    for tag, frames, height, width, with_text in TI2V_SIZES:
        try:
            run_ti2v_size(binary, work, timeout, cfg, W, d, d_plain, tag, frames, height, width, with_text,
                          failures)
        except (Failure, ValueError, OSError, KeyError) as e:
            failures.append("t_ti2v" + tag)
            print(f"FAIL t_ti2v{tag}: {e}", flush=True)
    try:
        check_ti2v_validation(binary, work, timeout, cfg, d, failures)
    except (Failure, ValueError, OSError, KeyError) as e:
        failures.append("t_bad")
        print(f"FAIL t_bad: {e}", flush=True)


def run_ti2v_size(binary, work, timeout, cfg, W, d, d_plain, tag, frames, height, width, with_text, failures):
    rng = np.random.default_rng(SEED + 21)
    C, F_, H_, W_ = cfg.latent_shape(frames, height, width)
    lat = rng.standard_normal((C, F_, H_, W_)).astype(np.float32)
    emb = rng.standard_normal((TEXT_LEN, cfg.text_dim)).astype(np.float32)
    neg = rng.standard_normal((TEXT_LEN, cfg.text_dim)).astype(np.float32)
    z = rng.standard_normal((C, 1, H_, W_)).astype(np.float32)
    paths = {k: os.path.join(work, f"t{tag}_{k}.safetensors") for k in ("latents", "embeds", "neg", "cond")}
    st.save_file({"latents": lat}, paths["latents"])
    st.save_file({"prompt_embeds": emb}, paths["embeds"])
    st.save_file({"prompt_embeds": neg}, paths["neg"])
    st.save_file({"condition_latents": z}, paths["cond"])
    lat, emb, neg, z = (a.astype(np.float64) for a in (lat, emb, neg, z))
    sched, steps, g, shift = ("unipc", 4, 5.0, 5.0) if not tag else ("unipc", 2, 5.0, 5.0)
    check_timestep_margins(sched, steps, shift)
    f = lambda x, tt, ctx, im: wr.forward(cfg, W, x, tt, ctx)  # noqa: E731

    def ref(M, variant="diffusers", per_token=True, replace=True):
        zz = z if replace else lat[:, :1]
        if per_token:
            model = sr.pipeline_model([f], emb, neg, g, first_frame=(zz, M))
        else:  # guard: frame 0 replaced but one scalar t for every token
            inner = sr.pipeline_model([f], emb, neg, g)
            model = lambda x, t, i: inner((1.0 - M[None]) * zz + M[None] * x, t, i)  # noqa: E731
        return sr.ti2v_sample(sched, model, lat, steps, shift, zz, M, variant)

    M1 = sr.ti2v_first_frame_mask(F_, H_, W_, conditioned=True)
    M0 = sr.ti2v_first_frame_mask(F_, H_, W_, conditioned=False)
    r_cond = ref(M1)
    r_text = ref(M0) if with_text else None
    r_orig = ref(M1, variant="original")
    sens = {"scalar t": rel_l2(ref(M1, per_token=False), r_cond),
            "frame 0 = noise, not z": rel_l2(ref(M1, replace=False), r_cond)}
    if r_text is not None:
        sens["text-only"] = rel_l2(r_text, r_cond)
    if min(sens.values()) < 100 * REL_L2_BOUND:
        raise Failure(f"case setup: alternative readings too close: {sens}")
    if rel_l2(r_orig, r_cond) > 1e-12:
        raise Failure(f"reference: diffusers and original frame-0 handling differ ({rel_l2(r_orig, r_cond):.1e})")

    def engine(model_dir, name, ranks, extra):
        out_path = os.path.join(work, f"{name}.r{ranks}.out.safetensors")
        cmd = [binary, "run", "--model", model_dir, "--ranks", str(ranks), "--backend", "cpu",
               "--frames", str(frames), "--height", str(height), "--width", str(width),
               "--steps", str(steps), "--guidance", repr(g), "--shift", repr(shift), "--scheduler", sched,
               "--seed", str(SEED), "--embeds", paths["embeds"], "--negative-embeds", paths["neg"],
               "--latents", paths["latents"], "--out", out_path] + extra
        _, secs = run_cmd(cmd, timeout)
        got = st.load_file(out_path)["latents"].astype(np.float64)
        if got.shape != lat.shape or not np.all(np.isfinite(got)):
            raise Failure(f"{name}: output shape {got.shape} (expected {lat.shape}) or non-finite values")
        return got, secs

    runs = [(f"t_ti2v{tag}_cond_{sched}{steps}_cfg5", r_cond, ["--condition", paths["cond"]])]
    if with_text:
        runs.append((f"t_ti2v{tag}_text_{sched}{steps}_cfg5", r_text, []))
    for name, r, extra in runs:
        outs = {}
        for ranks in (1, 2, 4):
            got, secs = engine(d, name, ranks, extra)
            outs[ranks] = got
            err = rel_l2(got, r)
            same = ranks == 1 or np.array_equal(got, outs[1])
            ok = err < REL_L2_BOUND and same
            note = ""
            if extra:  # frame 0 of the result is the condition, exactly
                f0 = np.array_equal(got[:, :1], z)
                ok = ok and f0
                note = f" frame0 == z: {f0}"
            print(f"{'ok  ' if ok else 'FAIL'} {name:30s} tokens={F_ * H_ * W_ // 4} ranks={ranks} rel_l2={err:.3e} "
                  f"(bound {REL_L2_BOUND:g}) engine {secs:.1f}s" + ("" if ranks == 1 else f" bitwise == ranks 1: {same}")
                  + note + " [alternatives: " + ", ".join(f"{k} {v:.1e}" for k, v in sens.items()) + "]", flush=True)
            if not ok:
                failures.append(name)
        if not extra:
            # Text-only TI2V is the scalar-timestep model bit for bit (same weights, expand_timesteps off).
            for ranks in (1, 4):
                plain, _ = engine(d_plain, f"t_ti2v{tag}_plain", ranks, [])
                same = np.array_equal(plain, outs[ranks])
                print(f"{'ok  ' if same else 'FAIL'} t_ti2v{tag}_text_is_scalar ranks={ranks} bitwise == "
                      f"expand_timesteps off: {same}", flush=True)
                if not same:
                    failures.append(f"t_ti2v{tag}_text_is_scalar")


def check_ti2v_validation(binary, work, timeout, cfg, d, failures):
    """A full-length condition on TI2V, a first-frame condition on a 16-channel T2V model: INVALID_ARGUMENT
    naming condition_latents."""
    frames, height, width = TI2V_SIZES[0][1:4]
    C, F_, H_, W_ = cfg.latent_shape(frames, height, width)
    bad = os.path.join(work, "t_bad_cond.safetensors")
    st.save_file({"condition_latents": np.zeros((C, F_, H_, W_), np.float32)}, bad)
    t2v_cond = os.path.join(work, "t_t2v_cond.safetensors")
    st.save_file({"condition_latents": np.zeros((16, 1, HEIGHT // 8, WIDTH // 8), np.float32)}, t2v_cond)
    for label, model, size, extra, field in (
            ("ti2v condition with F frames", d, (frames, height, width), ["--condition", bad],
             "condition_latents.shape"),
            ("t2v with a first-frame condition", os.path.join(work, "ck_f32"), (FRAMES, HEIGHT, WIDTH),
             ["--condition", t2v_cond], "condition_latents")):
        p = subprocess.run([binary, "run", "--model", model, "--frames", str(size[0]), "--height", str(size[1]),
                            "--width", str(size[2]), "--steps", "1", "--out", os.path.join(work, "t_bad.out")]
                           + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        last = (p.stdout.decode(errors="replace").strip().splitlines() or [""])[-1]
        ok = p.returncode != 0 and "INVALID_ARGUMENT" in last and field in last
        print(f"{'ok  ' if ok else 'FAIL'} t_bad {label:34s} -> {last[:160]}", flush=True)
        if not ok:
            failures.append("t_bad " + label)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="path to the denoised binary")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary folder, removed at exit)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per engine command")
    ap.add_argument("--only", help="comma-separated case-name prefixes to run")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    if not os.access(binary, os.X_OK):
        print(f"FAIL: --bin {binary} is not an executable", file=sys.stderr)
        return 2
    work = a.workdir or tempfile.mkdtemp(prefix="dn_check_engine_")
    os.makedirs(work, exist_ok=True)
    failures = []
    try:
        try:
            dirs = make_checkpoints(binary, work, a.timeout)
            models = check_checkpoints(dirs)
        except (Failure, ValueError, OSError) as e:
            print(f"FAIL checkpoints: {e}", file=sys.stderr)
            return 1
        paths, lat, emb, neg = write_inputs(work, models["f32"][0])
        outs = {}
        for name, ck, sched, steps, g, shift, use_neg, ranks in CASES:
            if a.only and not any(name.startswith(p) for p in a.only.split(",")):
                continue
            try:
                check_timestep_margins(sched, steps, shift)
                cfg, W = models[ck]
                out_path = os.path.join(work, name + ".out.safetensors")
                cmd = [binary, "run", "--model", dirs[ck], "--ranks", str(ranks), "--backend", "cpu",
                       "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
                       "--steps", str(steps), "--guidance", repr(g), "--shift", repr(shift),
                       "--scheduler", sched, "--seed", str(SEED), "--embeds", paths["embeds"],
                       "--latents", paths["latents"], "--out", out_path]
                if use_neg:
                    cmd += ["--negative-embeds", paths["neg"]]
                _, secs = run_cmd(cmd, a.timeout)
                got_all = st.load_file(out_path)
                if "latents" not in got_all:
                    raise Failure(f"{out_path}: no tensor 'latents' (has {sorted(got_all)})")
                if st.tensor_dtypes(out_path)["latents"] != "F32":
                    raise Failure(f"{out_path}: 'latents' dtype {st.tensor_dtypes(out_path)['latents']}, expected F32")
                got = got_all["latents"].astype(np.float64)
                if got.shape != lat.shape:
                    raise Failure(f"output shape {got.shape}, expected {lat.shape}")
                if not np.all(np.isfinite(got)):
                    raise Failure("output has non-finite values")
                ref = reference(cfg, W, lat, emb, neg if use_neg else None, sched, steps, shift, g)
                err, mx = rel_l2(got, ref), float(np.abs(got - ref).max())
                # Informational: the same reference with the sigmas stored as float32 (as diffusers
                # stores them); most of the remaining fp32-vs-f64 gap of the UniPC cases is this.
                ref32 = reference(cfg, W, lat, emb, neg if use_neg else None, sched, steps, shift, g,
                                  fp32_sigmas=True)
                extra = f" [f32-sigma ref: {rel_l2(got, ref32):.1e}]"
                if steps == 1 and sched == "euler" and g == 1.0:
                    # One Euler step from sigma_0 = 1: the output is x1 - v, so v = x1 - out.
                    v_ref, v_got = lat - ref, lat - got
                    extra += f" v: rel_l2={rel_l2(v_got, v_ref):.2e} |v|_rms={np.sqrt(np.mean(v_ref ** 2)):.3f}"
                    if np.sqrt(np.mean(v_ref ** 2)) < 1e-3:
                        raise Failure("reference velocity is ~0: the test would be vacuous")
                if ranks > 1:
                    single = SINGLE_RANK_TWIN.get(name)
                    if single in outs:
                        e2 = rel_l2(got, outs[single])
                        extra += f" vs ranks1: rel_l2={e2:.2e}"
                        if e2 >= RANKS_VS_SINGLE_BOUND:
                            failures.append(name)
                            extra += f" (>= {RANKS_VS_SINGLE_BOUND:g})"
                outs[name] = got
                ok = err < REL_L2_BOUND
                print(f"{'ok  ' if ok else 'FAIL'} {name:26s} ranks={ranks} ckpt={ck:4s} max_abs={mx:.3e} "
                      f"rel_l2={err:.3e} (bound {REL_L2_BOUND:g}) engine {secs:.1f}s{extra}", flush=True)
                if not ok:
                    failures.append(name)
                    diagnose(cfg, W, lat, emb, neg if use_neg else None, sched, steps, shift, g, got)
            except (Failure, ValueError, OSError) as e:
                failures.append(name)
                print(f"FAIL {name}: {e}", flush=True)
        run_two_expert_cases(binary, work, a.timeout, a.only, paths, lat, emb, neg, failures)
        run_lora_cases(binary, work, a.timeout, a.only, paths, lat, emb, neg, models, dirs, failures)
        run_i2v14b_cases(binary, work, a.timeout, a.only, paths, lat, emb, neg, failures)
        run_ti2v_cases(binary, work, a.timeout, a.only, failures)
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif a.keep:
            print(f"scratch kept in {work}")
    if failures:
        print(f"FAILED: {len(set(failures))} case(s): {', '.join(sorted(set(failures)))}", file=sys.stderr)
        return 1
    print("all engine cases match the reference")
    return 0


def diagnose(cfg, W, lat, emb, neg, sched, steps, shift, g, got):
    """On a mismatch, tries a few plausible alternative readings and reports the closest."""
    alts = {"text zero-padded to 512 tokens": dict(text_pad=512),
            "timestep fed as float sigma*1000": dict(t_mode="float"),
            "timestep fed as truncated int": dict(t_mode="int")}
    for label, kw in alts.items():
        try:
            r = reference(cfg, W, lat, emb, neg, sched, steps, shift, g, **kw)
            print(f"     diagnose: with '{label}': rel_l2={rel_l2(got, r):.3e}")
        except Exception as e:  # diagnostics are best effort
            print(f"     diagnose: '{label}' failed: {e}")


if __name__ == "__main__":
    sys.exit(main())

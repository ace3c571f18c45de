#!/usr/bin/env python3
"""Checks that the C++ engine reproduces the PyTorch demo model (tools/train_demo_model.py).

Usage: check_demo_parity.py --bin path/to/denoised [--model tools/demo_model] [--keep DIR]

Needs only NumPy (no torch): the PyTorch side is the fixture `parity.safetensors` that the training
script writes next to the weights (tensor names in tools/README.md). This script
  1. checks the prompt table (`prompts.safetensors`: one f32 [text_dim] vector per word, metadata
     tokens / grammar) and that the fixture's prompt_embeds is the contract's tokenisation of the
     fixture's prompt with that table (so fixture, table and tokeniser agree);
  2. runs `denoised run --backend cpu --model DIR` on the fixture's latents / embeddings:
       forward_cond / forward_uncond: one flow-Euler step without CFG. With shift 3 the schedule is
         sigma 1 -> 0 at timestep 1000, so the output is x - v and v = latents - output is the model's
         velocity at t = 1000 for the prompt / for the zero (unconditional) embedding;
       euler_cfg: 3 flow-Euler steps, CFG 5, shift 3 (timesteps 1000, 751.12, 8.93);
       unipc_cfg: 4 UniPC steps, CFG 5, shift 3 (the engine's default sampler; timesteps 999, 900, 750, 500);
  3. compares each with the PyTorch result: relative L2 ||engine - torch|| / ||torch|| < REL_L2_BOUND.
The PyTorch side ran in float64 on the exported f32 weights, the engine in float32, so the error is the
engine's float32 rounding (measured: see tools/README.md). It also checks that the result depends on
the prompt (v_cond != v_uncond), so the comparison cannot pass on a degenerate model.
Exits non-zero on any failure.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import safetensors_np as st  # noqa: E402

REL_L2_BOUND = 5e-5
FRAMES, HEIGHT, WIDTH = 8, 32, 32
FIXTURE = ("latents", "prompt_embeds", "negative_embeds", "v_cond", "v_uncond", "euler_out", "unipc_out")


class Failure(Exception):
    pass


def rel_l2(a, r):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm((a - r).ravel()) / max(np.linalg.norm(r.ravel()), 1e-300))


def tokenize(prompt, table, tokens):
    """The tokenisation of tools/README.md: lower-case, split on whitespace, every word in
    the table, at most T words, vectors in order, zero rows up to T."""
    words = prompt.lower().split()
    if len(words) > tokens:
        raise Failure(f"prompt {prompt!r}: {len(words)} words, more than T = {tokens}")
    text_dim = next(iter(table.values())).shape[0]
    e = np.zeros((tokens, text_dim), np.float32)
    for i, w in enumerate(words):
        if w not in table:
            raise Failure(f"prompt {prompt!r}: unknown word {w!r} (vocabulary: {' '.join(sorted(table))})")
        e[i] = table[w]
    return e


def check_files(model):
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    text_dim = int(cfg["text_dim"])
    if cfg.get("vae_stride") != [1, 1, 1] or cfg.get("in_channels") != 3 or cfg.get("out_channels") != 3:
        raise Failure(f"config.json: expected a pixel-space model (vae_stride [1,1,1], 3 in/out channels), got "
                      f"vae_stride {cfg.get('vae_stride')}, channels {cfg.get('in_channels')}/{cfg.get('out_channels')}")
    path = os.path.join(model, "prompts.safetensors")
    header, _ = st.read_header(path)
    meta = header.get("__metadata__", {})
    if "tokens" not in meta or "grammar" not in meta:
        raise Failure(f"{path}: __metadata__ lacks tokens/grammar (has {sorted(meta)})")
    tokens = int(meta["tokens"])
    table = st.load_file(path)
    dts = set(st.tensor_dtypes(path).values())
    if dts != {"F32"}:
        raise Failure(f"{path}: dtypes {sorted(dts)}, expected F32")
    for w, v in table.items():
        if v.shape != (text_dim,) or w != w.lower() or not w.isalpha():
            raise Failure(f"{path}: entry {w!r} shape {list(v.shape)}; expected lower-case words of shape [{text_dim}]")
    grammar_words = [g for g in meta["grammar"].split() if not g.startswith("<")]
    for g in grammar_words:
        if g not in table:
            raise Failure(f"{path}: grammar word {g!r} missing from the table")
    if len(meta["grammar"].split()) > tokens:
        raise Failure(f"{path}: grammar has more words than tokens = {tokens}")
    fix = st.load_file(os.path.join(model, "parity.safetensors"))
    fmeta = st.read_header(os.path.join(model, "parity.safetensors"))[0].get("__metadata__", {})
    missing = [n for n in FIXTURE if n not in fix]
    if missing:
        raise Failure(f"parity.safetensors: missing tensors {missing}")
    want = tokenize(fmeta.get("prompt", ""), table, tokens)
    if not np.array_equal(fix["prompt_embeds"], want):
        raise Failure(f"parity.safetensors: prompt_embeds is not the tokenisation of {fmeta.get('prompt')!r} "
                      "with prompts.safetensors")
    if not np.array_equal(fix["negative_embeds"], np.zeros_like(want)):
        raise Failure("parity.safetensors: negative_embeds is not the empty prompt (zeros)")
    if fix["latents"].shape != (3, FRAMES, HEIGHT, WIDTH):
        raise Failure(f"parity.safetensors: latents shape {list(fix['latents'].shape)}")
    print(f"prompt table ok: {len(table)} words x {text_dim}, T = {tokens}, grammar '{meta['grammar']}'; "
          f"fixture prompt '{fmeta.get('prompt')}' tokenises to its prompt_embeds")
    return fix


def run_engine(binary, model, work, name, extra, timeout):
    out = os.path.join(work, name + ".safetensors")
    args = [binary, "run", "--backend", "cpu", "--model", model, "--frames", str(FRAMES), "--height",
            str(HEIGHT), "--width", str(WIDTH), "--latents", os.path.join(work, "latents.safetensors"),
            "--out", out] + extra
    try:
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failure(f"timed out after {timeout}s: {' '.join(args)}")
    if p.returncode != 0:
        raise Failure(f"exit code {p.returncode}: {' '.join(args)}\n{p.stdout.decode(errors='replace')[-3000:]}")
    return st.load_file(out)["latents"]


def main():
    ap = argparse.ArgumentParser(description="C++ engine vs PyTorch demo model parity")
    ap.add_argument("--bin", required=True, help="the denoised binary")
    ap.add_argument("--model", default=os.path.join(HERE, "demo_model"))
    ap.add_argument("--keep", default="", help="keep the engine's inputs/outputs in this folder")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per engine run")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="demo-parity-")
    os.makedirs(work, exist_ok=True)
    try:
        fix = check_files(args.model)
        x = fix["latents"].astype(np.float32)
        st.save_file({"latents": x}, os.path.join(work, "latents.safetensors"))
        st.save_file({"prompt_embeds": fix["prompt_embeds"]}, os.path.join(work, "embeds.safetensors"))
        st.save_file({"prompt_embeds": fix["negative_embeds"]}, os.path.join(work, "neg.safetensors"))
        emb = ["--embeds", os.path.join(work, "embeds.safetensors")]
        neg = ["--negative-embeds", os.path.join(work, "neg.safetensors")]
        one = ["--steps", "1", "--scheduler", "euler", "--guidance", "1", "--shift", "3"]
        cases = [
            ("forward_cond", one + emb, "v_cond", True),
            ("forward_uncond", one + ["--embeds", os.path.join(work, "neg.safetensors")], "v_uncond", True),
            ("euler_cfg", ["--steps", "3", "--scheduler", "euler", "--guidance", "5", "--shift", "3"] + emb + neg,
             "euler_out", False),
            ("unipc_cfg", ["--steps", "4", "--scheduler", "unipc", "--guidance", "5", "--shift", "3"] + emb + neg,
             "unipc_out", False),
        ]
        failed = []
        for name, extra, ref_name, is_velocity in cases:
            out = run_engine(args.bin, args.model, work, name, extra, args.timeout)
            # One Euler step sigma 1 -> 0: out = x + (0 - 1) v, so v = x - out.
            got = x.astype(np.float64) - out.astype(np.float64) if is_velocity else out
            ref = fix[ref_name]
            if got.shape != ref.shape:
                raise Failure(f"{name}: engine output shape {list(got.shape)}, fixture {ref_name} {list(ref.shape)}")
            err = rel_l2(got, ref)
            ok = np.isfinite(err) and err < REL_L2_BOUND
            print(f"{name:15s} rel L2 {err:.3e} (bound {REL_L2_BOUND:g}) vs {ref_name} "
                  f"||ref|| {np.linalg.norm(ref):.2f}  {'ok' if ok else 'FAIL'}")
            if not ok:
                failed.append(name)
        sep = rel_l2(fix["v_uncond"], fix["v_cond"])
        print(f"prompt matters: ||v_cond - v_uncond|| / ||v_cond|| = {sep:.3e}")
        if not sep > 100 * REL_L2_BOUND:
            failed.append("prompt_matters")
        if failed:
            raise Failure("failed: " + ", ".join(failed))
        print("demo parity ok")
        return 0
    except (Failure, st.SafetensorsError, OSError, KeyError, ValueError) as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Float64 reference of per-request LoRA (docs/MODELS.md §6).

A LoRA file (safetensors tensors + header metadata) in any of the formats of §6 is parsed into
{diffusers module name: Adapter}, checked against the model's Linear shapes, and applied either merged
(W' = W + s * (alpha / r) * B A, b' = b + s * diff_b) or unmerged through wan_ref.forward(lora=...).
Formats:
- diffusers / PEFT: [transformer.]<module>.lora_A.weight [r, in], .lora_B.weight [out, r] (.lora_B.bias);
  alpha from the metadata key `lora_adapter_metadata` (JSON: [transformer.]lora_alpha, alpha_pattern), else
  alpha = r;
- original Wan / ComfyUI: [model.]diffusion_model.<original module>.lora_down.weight / .lora_up.weight (or
  lora_A / lora_B) / .alpha / .diff_b;
- kohya / musubi: lora_unet_<original module with '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha.
"""

import json
import re
from dataclasses import dataclass

import numpy as np

import wan_ref as wr


class LoraError(ValueError):
    """A LoRA file that cannot be applied; the message names the tensor."""


@dataclass
class Adapter:
    down: np.ndarray          # A [r, in]
    up: np.ndarray            # B [out, r]
    alpha: float
    bias_delta: object = None  # [out] or None (diff_b, or PEFT lora_B.bias already multiplied by alpha / r)

    @property
    def rank(self):
        return self.down.shape[0]

    @property
    def factor(self):
        return self.alpha / self.rank


def _original_module_to_diffusers(mod):
    """Original Wan module path -> diffusers module path, by the renames of MODELS.md §2 / §6."""
    name = mod + "."
    for pat, rep in wr._RENAMES:
        new = re.sub(pat, rep, name)
        if new != name:
            return new[:-1]
    return mod


def _diffusers_to_original(mod):
    """Inverse rename for the Linear modules a LoRA may target (used to resolve kohya underscore names)."""
    for orig, diff in (("self_attn.o", "attn1.to_out.0"), ("cross_attn.o", "attn2.to_out.0"),
                       ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
                       ("cross_attn.q", "attn2.to_q"), ("cross_attn.k_img", "attn2.add_k_proj"),
                       ("cross_attn.v_img", "attn2.add_v_proj"), ("cross_attn.k", "attn2.to_k"),
                       ("cross_attn.v", "attn2.to_v"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
                       ("time_projection.1", "condition_embedder.time_proj"),
                       ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
                       ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
                       ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
                       ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
                       ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
                       ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
                       ("head.head", "proj_out")):
        if mod.endswith(diff):
            return mod[: len(mod) - len(diff)] + orig
    return mod


_SUFFIXES = (("lora_A.weight", "down"), ("lora_down.weight", "down"), ("lora_B.weight", "up"),
             ("lora_up.weight", "up"), ("lora_B.bias", "up_bias"), ("alpha", "alpha"), ("diff_b", "diff_b"),
             ("diff", "diff"))


def parse_lora(tensors, metadata, cfg, source="lora"):
    """{diffusers module: Adapter} from a LoRA file's tensors and header metadata, validated against `cfg`'s
    Linear modules (shapes from wan_ref.expected_shapes). Raises LoraError naming `source` and the tensor."""
    shapes = wr.expected_shapes(cfg)
    modules = wr.linear_module_names(cfg)
    kohya = {"lora_unet_" + _diffusers_to_original(m).replace(".", "_"): m for m in modules}
    meta = {}
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        try:
            meta = {k[len("transformer."):] if k.startswith("transformer.") else k: v
                    for k, v in json.loads(raw).items()}
        except (ValueError, AttributeError) as err:
            raise LoraError(f"{source}: metadata lora_adapter_metadata is not a JSON object: {err}") from None

    parts = {}
    for key, val in tensors.items():
        for suf, role in _SUFFIXES:
            if key.endswith("." + suf):
                mod = key[: -len(suf) - 1]
                break
        else:
            raise LoraError(f"{source}: tensor {key}: not a LoRA tensor name")
        if mod.startswith("lora_unet_"):
            if mod not in kohya:
                raise LoraError(f"{source}: tensor {key}: no module {mod} in the model")
            target = kohya[mod]
        else:
            original = False
            for pre, orig in (("model.diffusion_model.", True), ("diffusion_model.", True),
                              ("base_model.model.", False), ("transformer.", False)):
                if mod.startswith(pre):
                    mod, original = mod[len(pre):], orig
                    break
            # original names (with or without the diffusion_model. prefix) are renamed; diffusers names kept
            target = _original_module_to_diffusers(mod) if original or mod not in modules else mod
        if target not in modules:
            raise LoraError(f"{source}: tensor {key}: no Linear {target} in the model")
        v = np.asarray(val, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise LoraError(f"{source}: tensor {key}: non-finite values")
        slot = parts.setdefault(target, {})
        if role in slot:
            raise LoraError(f"{source}: tensor {key}: {role} of {target} given twice")
        slot[role] = (key, v)

    out = {}
    for mod, slot in parts.items():
        out_f, in_f = shapes[mod + ".weight"]
        if "diff" in slot:
            raise LoraError(f"{source}: tensor {slot['diff'][0]}: full weight diffs are not supported")
        bias_delta = None
        if "diff_b" in slot:
            k, b = slot["diff_b"]
            if b.shape != (out_f,):
                raise LoraError(f"{source}: tensor {k}: shape {b.shape} != ({out_f},)")
            bias_delta = b
        if "down" not in slot or "up" not in slot:
            if set(slot) - {"diff_b"}:
                missing = "down" if "down" not in slot else "up"
                raise LoraError(f"{source}: module {mod}: {missing} matrix missing")
            out[mod] = Adapter(np.zeros((0, in_f)), np.zeros((out_f, 0)), 0.0, bias_delta)
            continue
        (ka, A), (kb, Bm) = slot["down"], slot["up"]
        if A.ndim != 2 or A.shape[1] != in_f or A.shape[0] < 1:
            raise LoraError(f"{source}: tensor {ka}: shape {A.shape}, expected [rank, {in_f}]")
        r = A.shape[0]
        if Bm.shape != (out_f, r):
            raise LoraError(f"{source}: tensor {kb}: shape {Bm.shape}, expected [{out_f}, {r}]")
        if "alpha" in slot:
            kal, al = slot["alpha"]
            if al.size != 1:
                raise LoraError(f"{source}: tensor {kal}: alpha must be a scalar, shape {al.shape}")
            alpha = float(al.reshape(-1)[0])
        else:
            pattern = meta.get("alpha_pattern") or {}
            alpha = float(pattern.get(mod, meta.get("lora_alpha", r)))
        if "up_bias" in slot:  # PEFT lora_B.bias: scaled like lora_B's output
            kbb, bb = slot["up_bias"]
            if bb.shape != (out_f,):
                raise LoraError(f"{source}: tensor {kbb}: shape {bb.shape} != ({out_f},)")
            bias_delta = (0.0 if bias_delta is None else bias_delta) + bb * (alpha / r)
        out[mod] = Adapter(A, Bm, alpha, bias_delta)
    return out


def as_forward_lora(requested):
    """[(parsed, scale), ...] -> the `lora` argument of wan_ref.forward (unmerged)."""
    out = {}
    for parsed, scale in requested:
        for mod, ad in parsed.items():
            bd = None if ad.bias_delta is None else scale * ad.bias_delta
            factor = scale * ad.factor if ad.rank else 0.0
            out.setdefault(mod, []).append((ad.down, ad.up, factor, bd))
    return out


def merge(W, requested):
    """New weights with every adapter merged: W' = W + sum s (alpha / r) B A, b' = b + sum s bias_delta.
    The input dict is not modified."""
    out = dict(W)
    for parsed, scale in requested:
        for mod, ad in parsed.items():
            if ad.rank:
                out[mod + ".weight"] = out[mod + ".weight"] + (scale * ad.factor) * (ad.up @ ad.down)
            if ad.bias_delta is not None:
                out[mod + ".bias"] = out[mod + ".bias"] + scale * ad.bias_delta
    return out

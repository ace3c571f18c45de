"""Minimal safetensors reader/writer in pure NumPy (reference tooling, not production code).

Format: 8-byte little-endian u64 N, then N bytes of UTF-8 JSON header
  {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
then the raw little-endian data; offsets are relative to the first byte after the header.
Supported dtypes: F64, F32, F16, BF16 (read and write), I64/I32/U8 (read).
BF16 is widened exactly to float32 (bits << 16); when writing BF16, float32 values are rounded to
nearest-even (NaN kept quiet).
"""

import json
import os
import struct

import numpy as np

_PLAIN = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
_ITEMSIZE = {"BF16": 2, **{k: v.itemsize for k, v in _PLAIN.items()}}


def bf16_bits_to_f32(bits):
    """uint16 array of bfloat16 bit patterns -> float32 array (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """float32 array -> uint16 bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def round_to_bf16(x):
    """Round a float array to the nearest bfloat16 value, returned as float32."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(np.shape(x))


class SafetensorsError(ValueError):
    pass


def read_header(path):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds file size {size}")
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


def load_file(path, names=None):
    """Returns {name: np.ndarray} (BF16 widened to float32; other dtypes as stored)."""
    header, data_start = read_header(path)
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if names is not None and name not in names:
                continue
            dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
            if dt not in _ITEMSIZE:
                raise SafetensorsError(f"{path}: tensor {name}: unsupported dtype {dt}")
            count = int(np.prod(shape, dtype=np.int64))
            if e - b != count * _ITEMSIZE[dt] or data_start + e > size or b > e:
                raise SafetensorsError(f"{path}: tensor {name}: bad data_offsets {b},{e} for {dt}{shape}")
            f.seek(data_start + b)
            buf = f.read(e - b)
            if dt == "BF16":
                arr = bf16_bits_to_f32(np.frombuffer(buf, dtype="<u2"))
            else:
                arr = np.frombuffer(buf, dtype=_PLAIN[dt]).copy()
            out[name] = arr.reshape(shape)
    return out


def tensor_dtypes(path):
    header, _ = read_header(path)
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def save_file(tensors, path, dtype="F32", metadata=None):
    """Writes {name: array} with every tensor converted to `dtype` (F32, F16, BF16 or F64)."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if dtype == "BF16":
            data = f32_to_bf16_bits(a.astype(np.float32)).astype("<u2").tobytes()
        elif dtype in ("F32", "F16", "F64"):
            data = np.ascontiguousarray(a.astype(_PLAIN[dtype])).tobytes()
        else:
            raise SafetensorsError(f"save_file: unsupported dtype {dtype}")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for data in blobs:
            f.write(data)


def load_model_dir(model_dir, base="diffusion_pytorch_model"):
    """Loads a diffusers-style weight folder: a single BASE.safetensors, or shards listed in
    BASE.safetensors.index.json ({"weight_map": {name: shard_file}})."""
    single = os.path.join(model_dir, base + ".safetensors")
    index = single + ".index.json"
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, set()).add(name)
        out = {}
        for shard, names in sorted(shards.items()):
            got = load_file(os.path.join(model_dir, shard), names)
            missing = names - set(got)
            if missing:
                raise SafetensorsError(f"{shard}: tensors listed in index but absent: {sorted(missing)[:5]}")
            out.update(got)
        return out
    if os.path.exists(single):
        return load_file(single)
    others = sorted(x for x in os.listdir(model_dir) if x.endswith(".safetensors"))
    if others:
        out = {}
        for x in others:
            out.update(load_file(os.path.join(model_dir, x)))
        return out
    raise SafetensorsError(f"{model_dir}: no {base}.safetensors, no index.json, no *.safetensors")

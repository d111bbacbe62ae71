#!/usr/bin/env python3
"""Writes the small seed corpus of the fuzz targets (fuzz/corpus/<target>/) from the
bundled fixtures and hand-made malformed cases. Run from fuzz/: python3 make_seeds.py"""
import json, os, struct

ROOT = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(ROOT, "..", "fixtures")


def out(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def st_file(header, data_len, pad=True):
    h = json.dumps(header, separators=(",", ":")).encode() if not isinstance(header, bytes) else header
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


# safetensors_header
T = "safetensors_header"
valid = {"__metadata__": {"format": "pt"},
         "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
         "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [12, 24]}}
out(T, "valid_two_tensors", st_file(valid, 24))
out(T, "valid_empty", st_file({}, 0))
out(T, "valid_metadata_only", st_file({"__metadata__": {"format": "pt"}}, 0))
out(T, "valid_scalar", st_file({"s": {"dtype": "F16", "shape": [], "data_offsets": [0, 2]}}, 2))
out(T, "valid_zero_dim", st_file({"z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}}, 0))
# The tiny fixture's real tensor names, each shrunk to one element (same dtypes).
b = open(os.path.join(FIX, "qwen3-vl-tiny", "model.safetensors"), "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
shrunk, off = {"__metadata__": h.get("__metadata__", {})}, 0
for name, e in h.items():
    if name == "__metadata__":
        continue
    size = {"F32": 4, "F16": 2, "BF16": 2}.get(e["dtype"], 4)
    shrunk[name] = {"dtype": e["dtype"], "shape": [1], "data_offsets": [off, off + size]}
    off += size
out(T, "fixture_names_shrunk", st_file(shrunk, off))
# The fixture's header with its data section cut off (offsets run past the end).
out(T, "fixture_header_truncated_data", b[:8 + n] + b[8 + n:8 + n + 64])
# Malformed.
out(T, "empty", b"")
out(T, "seven_bytes", b"\x08\0\0\0\0\0\0")
out(T, "len_over_limit", struct.pack("<Q", 200 << 20) + b"{}")
out(T, "len_u64_max", struct.pack("<Q", 2**64 - 1) + b"{}")
out(T, "len_past_end", struct.pack("<Q", 100) + b"{}")
out(T, "not_utf8", struct.pack("<Q", 4) + b"\xff\xfe{}")
out(T, "not_json", st_file(b"{not json", 0))
out(T, "not_object", st_file(b"[1,2,3]", 0))
out(T, "entry_not_object", st_file({"a": 5}, 0))
out(T, "missing_dtype", st_file({"a": {"shape": [1], "data_offsets": [0, 4]}}, 4))
out(T, "bad_dtype", st_file({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, 4))
out(T, "shape_negative", st_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4))
out(T, "shape_float", st_file({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, 4))
out(T, "shape_overflow", st_file({"a": {"dtype": "F32", "shape": [2**32, 2**32, 16], "data_offsets": [0, 4]}}, 4))
out(T, "offsets_three", st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, 8))
out(T, "offsets_reversed", st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 8))
out(T, "offsets_past_data", st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 2))
out(T, "offsets_huge", st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [2**64 - 4, 2**64]}}, 4))
out(T, "size_mismatch", st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4))
out(T, "overlap", st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12))
out(T, "duplicate_key", st_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4))

# config_json
T = "config_json"
for fx in sorted(os.listdir(FIX)):
    p = os.path.join(FIX, fx, "config.json")
    if os.path.isfile(p):
        out(T, "fixture_" + fx, open(p, "rb").read())
base = json.load(open(os.path.join(FIX, "qwen3-vl-tiny", "config.json")))


def variant(name, f):
    c = json.loads(json.dumps(base))
    f(c)
    out(T, name, json.dumps(c))


variant("model_type_unknown", lambda c: (c.__setitem__("model_type", "llama"), c.__setitem__("architectures", [])))
variant("no_text_config", lambda c: c.pop("text_config"))
variant("no_vision_config", lambda c: c.pop("vision_config"))
variant("zero_heads", lambda c: c["text_config"].__setitem__("num_attention_heads", 0))
variant("zero_layers", lambda c: c["text_config"].__setitem__("num_hidden_layers", 0))
variant("huge_hidden", lambda c: c["text_config"].__setitem__("hidden_size", 2**63))
variant("negative_vocab", lambda c: c["text_config"].__setitem__("vocab_size", -1))
variant("string_layers", lambda c: c["text_config"].__setitem__("num_hidden_layers", "28"))
variant("huge_merge", lambda c: c["vision_config"].__setitem__("spatial_merge_size", 2**40))
variant("huge_out_hidden", lambda c: c["vision_config"].__setitem__("out_hidden_size", 2**62))
variant("moe_no_experts", lambda c: c.__setitem__("model_type", "qwen3_vl_moe"))
variant("moe_huge_experts", lambda c: (c.__setitem__("model_type", "qwen3_vl_moe"),
                                       c["text_config"].update(num_experts=2**40, num_experts_per_tok=2,
                                                               moe_intermediate_size=2**30)))
variant("mrope_overflow", lambda c: c["text_config"].setdefault("rope_scaling", {}).__setitem__("mrope_section", [2**63, 2**63, 4]) if "rope_scaling" in c["text_config"] else c["text_config"]["rope_parameters"].__setitem__("mrope_section", [2**63, 2**63, 4]))
variant("huge_temporal_patch", lambda c: c["vision_config"].__setitem__("temporal_patch_size", 2**40))
variant("huge_in_channels", lambda c: c["vision_config"].__setitem__("in_channels", 2**40))
out(T, "empty", "")
out(T, "not_object", "[]")
out(T, "truncated", json.dumps(base)[:200])
out(T, "deep_nesting", "[" * 200 + "]" * 200)

# safetensors_index
T = "safetensors_index"
wm = {name: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
      for i, name in enumerate(list(h)[1:20])}
out(T, "valid", json.dumps({"metadata": {"total_size": 1234}, "weight_map": wm}))
out(T, "empty_map", '{"weight_map":{}}')
out(T, "no_map", '{"metadata":{}}')
out(T, "map_not_strings", '{"weight_map":{"a":1}}')
out(T, "path_shard", '{"weight_map":{"a":"../etc/passwd"}}')
out(T, "not_json", "{weight_map")

"""llama.cpp beside vlmem: `vlmem bench e2e --peers` writes this file next to its Python
virtual environment and runs it there (the `gguf` and `llama-cpp-python` packages).

Commands (each prints one JSON object on its last stdout line; logs go to stderr):

  versions                      the Python, gguf and llama-cpp-python versions, llama.cpp's
                                system info
  cpu                           whether the CPU advertises AMX and the kernel lets it be used
                                (standard library only)
  write   --out F --hidden ...  a BF16 GGUF of a Qwen3 text decoder (llama.cpp arch `qwen3`)
                                with seeded random weights N(0, 0.02), norms 1
  quantize --inp F --out G --ftype q8_0|q4_k_m [--threads N]
                                llama.cpp's own quantizer (llama_model_quantize); its Q8_0
                                tensors are the same bytes as the gguf package's Python
                                quantizer makes, in less than half the time
  bench   --model F --threads N --decode-tokens 32 --prompt-tokens 512 --reps 3
                                decode tok/s (one token per llama_decode, greedy on the
                                logits) and prompt processing tok/s (one llama_decode of the
                                whole prompt), medians over the repetitions after a warm-up
  serve   --model F --threads N --seqs 1,4,16 --prompt-tokens 16 --gen-tokens 32 --reps 2
                                batched decode as llama-batched-bench measures it: N sequences
                                of distinct random prompts (one llama_decode of all prompts),
                                then gen-tokens - 1 steps of one token per sequence in one
                                llama_decode (greedy per sequence); every run's times
"""

import argparse
import json
import os
import statistics
import sys
import time


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# versions


def cmd_versions(_args):
    out = {"python": sys.version.split()[0]}
    try:
        import gguf  # noqa: F401
        from importlib.metadata import version

        out["gguf"] = version("gguf")
    except Exception as e:  # reported, not raised: the caller names what is missing
        out["gguf_error"] = repr(e)
    try:
        import llama_cpp
        from importlib.metadata import version

        out["llama_cpp_python"] = version("llama-cpp-python")
        out["system_info"] = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    except Exception as e:
        out["llama_cpp_error"] = repr(e)
    emit(out)


# ---------------------------------------------------------------------------------------------
# cpu (standard library only: runs before the environment exists)


def cmd_cpu(_args):
    """Whether the CPU advertises AMX and whether the kernel lets a process use its tiles.

    A CPU can list amx_tile in /proc/cpuinfo while the kernel (a VM's, say) does not support
    the tile data state: AMX instructions then fault. ggml asks the kernel for permission, is
    told yes, and faults in its first AMX matmul; so the build leaves AMX out there.
    """
    import ctypes

    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    advertised = "amx_tile" in flags
    usable = None
    if advertised:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            supported = ctypes.c_ulong(0)
            SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, XFEATURE_XTILEDATA = 158, 0x1022, 18
            if libc.syscall(SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, ctypes.byref(supported)) == 0:
                usable = bool(supported.value & (1 << XFEATURE_XTILEDATA))
        except Exception:
            usable = None
    emit({"amx_advertised": advertised, "amx_usable": usable})


# ---------------------------------------------------------------------------------------------
# write: the BF16 GGUF


def tensor_plan(a):
    """(name, shape as rows x cols in numpy order, kind) of every tensor, in file order."""
    h, hd = a.hidden, a.head_dim
    plan = [("token_embd.weight", (a.vocab, h), "w")]
    if not a.tied:
        plan.append(("output.weight", (a.vocab, h), "w"))
    plan.append(("output_norm.weight", (h,), "norm"))
    for i in range(a.layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (h,), "norm"),
            (p + "attn_q.weight", (a.heads * hd, h), "w"),
            (p + "attn_k.weight", (a.kv_heads * hd, h), "w"),
            (p + "attn_v.weight", (a.kv_heads * hd, h), "w"),
            (p + "attn_output.weight", (h, a.heads * hd), "w"),
            (p + "attn_q_norm.weight", (hd,), "norm"),
            (p + "attn_k_norm.weight", (hd,), "norm"),
            (p + "ffn_norm.weight", (h,), "norm"),
            (p + "ffn_gate.weight", (a.intermediate, h), "w"),
            (p + "ffn_up.weight", (a.intermediate, h), "w"),
            (p + "ffn_down.weight", (h, a.intermediate), "w"),
        ]
    return plan


def bf16_bytes(x):
    """float32 -> bfloat16 bits (round to nearest even; the inputs are finite), as uint8."""
    import numpy as np

    n = x.view(np.uint32)
    n = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return n.astype(np.uint16).view(np.uint8)


def cmd_write(a):
    import numpy as np
    import gguf

    t0 = time.time()
    plan = tensor_plan(a)
    tmp = a.out + ".partial"
    w = gguf.GGUFWriter(tmp, "qwen3")
    w.add_name("vlmem-random-qwen3-text-decoder")
    w.add_context_length(a.context)
    w.add_embedding_length(a.hidden)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.intermediate)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    # No tokenizer: llama.cpp then makes `vocab` dummy tokens, enough for token ids.
    w.add_tokenizer_model("none")
    w.add_vocab_size(a.vocab)
    bf16 = gguf.GGMLQuantizationType.BF16
    for name, shape, kind in plan:
        if kind == "norm":
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            # Shape in bytes (uint8 rows of 2 bytes per weight), as the writer expects raw data.
            w.add_tensor_info(name, (shape[0], shape[1] * 2), np.dtype(np.uint8),
                              shape[0] * shape[1] * 2, raw_dtype=bf16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    params = 0
    rows_per_chunk = 4096
    for idx, (name, shape, kind) in enumerate(plan):
        if kind == "norm":
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            params += shape[0]
            continue
        rows, cols = shape
        # One stream per tensor, so a tensor's weights do not depend on the others.
        rng = np.random.default_rng([a.seed, idx])
        out = np.empty((rows, cols * 2), dtype=np.uint8)
        for r in range(0, rows, rows_per_chunk):
            k = min(rows_per_chunk, rows - r)
            x = rng.standard_normal((k, cols), dtype=np.float32)
            x *= np.float32(0.02)
            out[r:r + k] = bf16_bytes(x).reshape(k, cols * 2)
        w.write_tensor_data(out)
        params += rows * cols
    w.close()
    os.replace(tmp, a.out)
    emit({"out": a.out, "tensors": len(plan), "params": params,
          "file_bytes": os.path.getsize(a.out), "seconds": round(time.time() - t0, 2)})


# ---------------------------------------------------------------------------------------------
# quantize


FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "bf16": "LLAMA_FTYPE_MOSTLY_BF16"}


def cmd_quantize(a):
    import llama_cpp as L

    t0 = time.time()
    L.llama_backend_init()
    p = L.llama_model_quantize_default_params()
    p.nthread = a.threads
    p.ftype = getattr(L, FTYPES[a.ftype])
    tmp = a.out + ".partial"
    rc = L.llama_model_quantize(a.inp.encode(), tmp.encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({a.inp} -> {a.ftype}) returned {rc}")
    os.replace(tmp, a.out)
    emit({"out": a.out, "ftype": a.ftype, "via": "llama_model_quantize",
          "file_bytes": os.path.getsize(a.out), "seconds": round(time.time() - t0, 2)})


# ---------------------------------------------------------------------------------------------
# bench


def cmd_bench(a):
    import ctypes
    import random
    import numpy as np
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    t0 = time.time()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {a.model}")
    load_s = time.time() - t0
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    batch = max(512, a.prompt_tokens)
    cp.n_ctx = a.prompt_tokens + a.decode_tokens + 64
    cp.n_batch = batch
    cp.n_ubatch = batch
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    cp.no_perf = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not make a context")
    mem = L.llama_get_memory(ctx)
    rnd = random.Random(a.seed)
    # Ids clear of the low (special-looking) range, as a prompt's would be.
    ids = lambda n: [rnd.randrange(min(1000, n_vocab // 2), n_vocab) for _ in range(n)]

    def decode(tokens):
        arr = (L.llama_token * len(tokens))(*tokens)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise SystemExit(f"llama_decode of {len(tokens)} tokens returned {rc}")

    def next_token():
        logits = L.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    def prefill_run():
        L.llama_memory_clear(mem, True)
        toks = ids(a.prompt_tokens)
        t = time.perf_counter()
        decode(toks)
        return a.prompt_tokens / (time.perf_counter() - t)

    def decode_run():
        L.llama_memory_clear(mem, True)
        decode(ids(a.short_prompt_tokens))
        tok = next_token()
        L.llama_perf_context_reset(ctx)
        spent = 0.0
        for _ in range(a.decode_tokens):
            t = time.perf_counter()
            decode([tok])
            tok = next_token()
            spent += time.perf_counter() - t
        perf = L.llama_perf_context(ctx)
        own = perf.n_eval * 1000.0 / perf.t_eval_ms if perf.t_eval_ms > 0 else None
        return a.decode_tokens / spent, own

    # Warm-up: pages the weights in (the mmap), sizes llama.cpp's buffers.
    prefill_run()
    decode_run()
    prefill = [prefill_run() for _ in range(a.reps)]
    dec = [decode_run() for _ in range(a.reps)]
    dec_wall = [d[0] for d in dec]
    dec_own = [d[1] for d in dec if d[1] is not None]
    desc = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, desc, len(desc))
    out = {
        "model": a.model,
        "desc": desc.value.decode("utf-8", "replace"),
        "params": int(L.llama_model_n_params(model)),
        "model_bytes": int(L.llama_model_size(model)),
        "threads": a.threads,
        "load_s": round(load_s, 3),
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "prefill_tok_s": prefill,
        "decode_tok_s": dec_wall,
        "decode_tok_s_llama": dec_own,
        "prefill_tok_s_median": statistics.median(prefill),
        "decode_tok_s_median": statistics.median(dec_wall),
    }
    L.llama_free(ctx)
    L.llama_model_free(model)
    emit(out)


# ---------------------------------------------------------------------------------------------
# serve


def peak_rss_bytes():
    """This process's peak resident set: VmHWM, the peak of its own address space.

    Not ru_maxrss: Linux carries it across fork and exec, so a process started by a large
    parent reports the parent's resident set at the fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evict_page_cache(path):
    """Drops the file's clean pages from the page cache (posix_fadvise DONTNEED).

    A memory cgroup is charged for the page cache its processes bring in, but pages already
    cached (charged to whoever read them first) are used uncharged: a model file left in the
    cache by an earlier run would be read for free past the cgroup's limit.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cmd_serve(a):
    """Batched decode of N sequences at once, as llama-batched-bench measures it.

    One context holds max(N) sequences (n_seq_max); its KV cache is unified (one buffer of
    n_ctx = max(N) * (prompt + gen) cells) unless --kv-unified 0, where llama.cpp gives each
    sequence its own 256-cell-padded stream. For each N: the memory cleared, the N prompts in
    one llama_decode (each sequence's last token outputs logits), then gen-tokens - 1 steps,
    each one llama_decode of one token per sequence at its next position, the next tokens
    chosen greedily from each sequence's logits between steps (outside the timed calls).
    S_TG = N * (gen-tokens - 1) / (the steps' llama_decode time), as llama-batched-bench
    counts it. The runs go 1, 4, 16 then 16, 4, 1 and so on, after one warm-up run at the
    smallest N (it pages the weights in when they fit).
    """
    import ctypes
    import random
    import numpy as np
    import llama_cpp as L

    if a.evict:
        evict_page_cache(a.model)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    t0 = time.time()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {a.model}")
    load_s = time.time() - t0
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    seqs = sorted({int(x) for x in a.seqs.split(",") if x.strip()})
    if not seqs or seqs[0] < 1 or a.prompt_tokens < 1 or a.gen_tokens < 2:
        raise SystemExit("serve needs sequences >= 1, a prompt and at least 2 new tokens")
    nmax = seqs[-1]
    per_seq = a.prompt_tokens + a.gen_tokens
    cp = L.llama_context_default_params()
    cp.n_seq_max = nmax
    cp.kv_unified = bool(a.kv_unified)
    cp.n_ctx = nmax * per_seq
    cp.n_batch = max(nmax * a.prompt_tokens, nmax)
    cp.n_ubatch = cp.n_batch
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    cp.no_perf = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not make a context")
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(cp.n_batch, 0, 1)
    rnd = random.Random(a.seed)
    lo = min(1000, n_vocab // 2)
    # Distinct ids within each prompt, and a different prompt for each sequence.
    prompts = [rnd.sample(range(lo, n_vocab), a.prompt_tokens) for _ in range(nmax)]

    def fill(entries):
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if out else 0

    def decode():
        t = time.perf_counter()
        rc = L.llama_decode(ctx, batch)
        spent = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"llama_decode of {batch.n_tokens} tokens returned {rc}")
        return spent

    def argmax(i):
        logits = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    def run(n, gen):
        L.llama_memory_clear(mem, True)
        started = time.perf_counter()
        p = a.prompt_tokens
        fill([(tok, k, j, k == p - 1) for j in range(n) for k, tok in enumerate(prompts[j])])
        prefill_s = decode()
        toks = [argmax(j * p + p - 1) for j in range(n)]
        ids = [[t] for t in toks]
        decode_s = 0.0
        for step in range(gen - 1):
            fill([(toks[j], p + step, j, True) for j in range(n)])
            decode_s += decode()
            toks = [argmax(j) for j in range(n)]
            for j in range(n):
                ids[j].append(toks[j])
        wall_s = time.perf_counter() - started
        rows = n * (gen - 1)
        return {"seqs": n, "prefill_s": prefill_s, "decode_s": decode_s, "decode_rows": rows,
                "steps": gen - 1, "wall_s": wall_s, "tok_s": rows / decode_s if decode_s > 0 else 0.0,
                "ids": ids}

    t = time.time()
    run(seqs[0], min(a.gen_tokens, 4))
    warmup_s = time.time() - t
    runs = []
    for rep in range(a.reps):
        for n in (seqs if rep % 2 == 0 else list(reversed(seqs))):
            r = run(n, a.gen_tokens)
            r["rep"] = rep
            runs.append(r)
            log(f"serve: {n} sequences, rep {rep}: {r['tok_s']:.3f} tok/s")
    # Whether each sequence got the same ids at every N (llama.cpp does not promise it).
    first = {}
    same = True
    for r in runs:
        for j, ids in enumerate(r.pop("ids")):
            same = same and first.setdefault(j, ids) == ids
    desc = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, desc, len(desc))
    out = {
        "model": a.model,
        "desc": desc.value.decode("utf-8", "replace"),
        "model_bytes": int(L.llama_model_size(model)),
        "threads": a.threads,
        "n_ctx": int(L.llama_n_ctx(ctx)),
        "n_batch": int(cp.n_batch),
        "kv_unified": bool(a.kv_unified),
        "evicted": bool(a.evict),
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "ids_agree": same,
        "runs": runs,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    emit(out)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions")
    sub.add_parser("cpu")
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    for k in ("hidden", "layers", "heads", "kv-heads", "head-dim", "intermediate", "vocab",
              "context", "seed"):
        w.add_argument("--" + k, type=int, required=True)
    w.add_argument("--rope-theta", type=float, required=True)
    w.add_argument("--rms-eps", type=float, required=True)
    w.add_argument("--tied", type=int, choices=[0, 1], required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--inp", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--ftype", choices=sorted(FTYPES), required=True)
    q.add_argument("--threads", type=int, default=0)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--threads", type=int, required=True)
    b.add_argument("--decode-tokens", type=int, default=32)
    b.add_argument("--short-prompt-tokens", type=int, default=8)
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("serve")
    s.add_argument("--model", required=True)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--seqs", default="1,4,16")
    s.add_argument("--prompt-tokens", type=int, default=16)
    s.add_argument("--gen-tokens", type=int, default=32)
    s.add_argument("--reps", type=int, default=2)
    s.add_argument("--kv-unified", type=int, choices=[0, 1], default=1)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--evict", type=int, choices=[0, 1], default=0)
    a = ap.parse_args()
    {"versions": cmd_versions, "cpu": cmd_cpu, "write": cmd_write, "quantize": cmd_quantize,
     "bench": cmd_bench, "serve": cmd_serve}[a.cmd](a)


if __name__ == "__main__":
    main()

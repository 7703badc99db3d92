"""llama.cpp against meswitch on the same GGUF: decode tokens/s at batch 1, 8 and 16, in one process.

What CPU users would otherwise run is llama.cpp on the GGUF they downloaded. The base meswitch
serves (the zoo's) is the packaged SmolLM2-135M-Instruct Q4_1 GGUF dequantized to fp32, so the two
decode the same model. Rows:

  llama.cpp Q4_1    the shipped file, through llama-cpp-python's low-level API
  llama.cpp Q8_0    the same model requantized by llama.cpp's own quantizer (``llama_model_quantize``)
  llama.cpp F32     the same, at meswitch's base precision
  meswitch base     ``Engine`` with the store's base alone (EngineConfig's default policy: the base served
                    from the GGUF's own Q4_1/Q8_0 blocks, docs/engine.md)
  meswitch base fp32  the same with ``base_weights="dense"``: the blocks dequantized to float32
  meswitch mixed16  16 experts of benchmarks/engine.py's ``bench16`` store, requests round-robin

Each row decodes ``batch`` sequences of the same chat prompt, one sequence per row of every step
(llama.cpp: one ``llama_decode`` of ``batch`` tokens with distinct sequence ids), greedy, for
``--steps`` tokens after the prefill; tokens/s = batch x steps / time, prefill excluded. Every row
is timed in turn at each batch size (``--repeats`` rounds, the median kept), so that a shared
machine's drift falls on all of them alike. Both use ``--threads`` threads.

llama-cpp-python is not a dependency: it builds from source (about 15 minutes on 2 cores). ``make
llamacpp`` builds its wheel once into ``~/.cache/meswitch/wheels`` and installs it; without it this
script says so and exits 2. The requantized GGUFs are cached under ``~/.cache/meswitch/gguf``.

    python benchmarks/llamacpp.py [--store DIR] [--steps 32] [--repeats 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402
from engine import PROMPT, decode_rate, many_experts_store  # noqa: E402

BATCHES = (1, 8, 16)
VARIANTS = {"Q4_1": None, "Q8_0": 7, "F32": 0}  # GGUF type -> llama_ftype to requantize to (None: the shipped file)
WARMUP = 4  # decode steps before timing
_QUIET = None  # llama.cpp's log callback (kept referenced: ctypes frees a callback nobody holds)


class LlamaCpp:
    """One GGUF loaded by llama.cpp with a context for up to ``max_batch`` sequences of ``max_len`` tokens."""

    def __init__(self, path: Path, max_batch: int, max_len: int, threads: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        p = lc.llama_context_default_params()
        p.n_ctx = max_batch * max_len
        p.n_batch = p.n_ubatch = max(512, max_batch * 8)
        p.n_seq_max = max_batch
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(p.n_batch, 0, max_batch)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``rows``: (token, position, sequence id, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        if rc := self.lc.llama_decode(self.ctx, b):
            raise RuntimeError(f"llama_decode returned {rc}")

    def _greedy(self, i: int) -> int:
        """The most likely next token after output row ``i`` of the last decode."""
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).argmax())

    def decode_rate(self, prompt: list[int], batch: int, steps: int) -> float:
        """Tokens/s of ``steps`` greedy decode steps of ``batch`` sequences of ``prompt``, prefill excluded."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        nxt = []
        for s in range(batch):  # prefill, one sequence per call (as requests arrive)
            self._decode([(t, j, s, j == len(prompt) - 1) for j, t in enumerate(prompt)])
            nxt.append(self._greedy(len(prompt) - 1))
        t0 = time.perf_counter()
        for step in range(steps):
            self._decode([(nxt[s], len(prompt) + step, s, True) for s in range(batch)])
            nxt = [self._greedy(s) for s in range(batch)]
        return batch * steps / (time.perf_counter() - t0)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def gguf_variant(src: Path, kind: str, ftype: int | None, cache: Path) -> Path:
    """``src`` itself (``ftype`` None), or ``src`` requantized to ``ftype`` by llama.cpp, cached in ``cache``."""
    if ftype is None:
        return src
    import llama_cpp as lc

    out = cache / f"{src.stem}.{kind}.gguf"
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = ftype, True
    if rc := lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize({src.name} -> {kind}) returned {rc}")
    tmp.replace(out)  # atomic: a crash leaves no half-written variant to be reused
    return out


def prompt_ids(tokenizer) -> list[int]:
    """The benchmark prompt as the base's chat template gives it (both programs decode these ids)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]  # a BatchEncoding or a list


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache/meswitch/stores/full")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="GGUF types for llama.cpp, of " + ",".join(VARIANTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: `make llamacpp` builds it once (about 15 minutes on 2 cores) "
              "and caches the wheel", file=sys.stderr)
        return 2
    import torch

    from meswitch.engine import Engine, EngineConfig
    from meswitch.model.checkpoint import load_checkpoint, packaged_gguf_path
    from meswitch.paths import cache_root
    from meswitch.store import DeltaStore

    torch.set_num_threads(args.threads)
    global _QUIET  # the callback must outlive every llama.cpp call that may log through it
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    src = DeltaStore.open(args.store)
    store16, names16 = many_experts_store(src, 16, cache_root() / "stores" / "bench16")
    base, tok = load_checkpoint(Path(src.extra["base_path"]))
    prompt = prompt_ids(tok)
    max_len = len(prompt) + args.steps + WARMUP + 8
    gguf = packaged_gguf_path()
    runners = {f"llama.cpp {k}": LlamaCpp(gguf_variant(gguf, k, VARIANTS[k], cache_root() / "gguf"), 16, max_len,
                                          args.threads) for k in args.variants.split(",")}
    engine = Engine(store16, base, tok, EngineConfig(max_batch=16), check_base=False)
    dense = Engine(store16, base, tok, EngineConfig(max_batch=16, base_weights="dense"), check_base=False)
    cases = {"meswitch base": (engine, [None]), "meswitch base fp32": (dense, [None]),
             "meswitch mixed16": (engine, names16)}

    def rate(row: str, b: int, steps: int) -> float:
        if row in runners:
            return runners[row].decode_rate(prompt, b, steps)
        return decode_rate(cases[row][0], cases[row][1], b, steps)

    rows = [*runners, *cases]
    results = {"machine": machine(), "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
               "gguf": gguf.name, "llama_cpp_python": llama_cpp.__version__, "prompt_tokens": len(prompt),
               "backend": engine.backend_selection.describe(), "base_weights": engine.base_weights.describe(),
               "tokens_per_s": {}, "samples": {}}
    for b in BATCHES:
        for row in rows:
            rate(row, b, WARMUP)  # loads, caches and merges happen here, not in the timing
        samples: dict[str, list[float]] = {r: [] for r in rows}
        for _ in range(args.repeats):
            for row in rows:
                samples[row].append(rate(row, b, args.steps))
        for row in rows:
            results["tokens_per_s"].setdefault(row, {})[str(b)] = statistics.median(samples[row])
            results["samples"].setdefault(row, {})[str(b)] = samples[row]
            print(f"{row:18s} batch {b:2d}: {statistics.median(samples[row]):7.1f} tok/s "
                  f"({', '.join(f'{x:.1f}' for x in samples[row])})", file=sys.stderr, flush=True)
    for r in runners.values():
        r.close()
    out = results_dir()
    (out / "llamacpp.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (out / "llamacpp.md").write_text(md)
    plot(results, out / "llamacpp.png")
    print(json.dumps(results, indent=2) if args.json else md)
    return 0


def table(r: dict) -> str:
    """Markdown: tokens/s per row and batch, then meswitch's ratios to llama.cpp's shipped file and its best GGUF."""
    tps = r["tokens_per_s"]
    bs = [str(b) for b in BATCHES]
    lines = [f"Decode tokens/s, {r['threads']} threads, {r['steps']} steps after a {r['prompt_tokens']}-token prompt "
             f"(median of {r['repeats']}, taken in turn), {r['gguf']}, llama-cpp-python {r['llama_cpp_python']}:", "",
             "| row | " + " | ".join(f"batch {b}" for b in bs) + " |", "|---|" + "---|" * len(bs)]
    lines += [f"| {row} | " + " | ".join(f"{v[b]:.1f}" for b in bs) + " |" for row, v in tps.items()]
    ll = {row: v for row, v in tps.items() if row.startswith("llama.cpp")}
    if ll:
        best = {b: max(v[b] for v in ll.values()) for b in bs}
        shipped = ll.get("llama.cpp Q4_1")
        lines += ["", "| ratio | " + " | ".join(f"batch {b}" for b in bs) + " |", "|---|" + "---|" * len(bs)]
        for row in ("meswitch base", "meswitch mixed16"):
            if shipped:
                lines.append(f"| {row} / llama.cpp Q4_1 | " + " | ".join(f"{tps[row][b] / shipped[b]:.2f}x" for b in bs)
                             + " |")
            lines.append(f"| {row} / llama.cpp best GGUF | " + " | ".join(f"{tps[row][b] / best[b]:.2f}x" for b in bs)
                         + " |")
        if "meswitch base fp32" in tps:
            lines.append("| meswitch base / meswitch base fp32 | " + " | ".join(
                f"{tps['meswitch base'][b] / tps['meswitch base fp32'][b]:.2f}x" for b in bs) + " |")
        lines.append("| meswitch mixed16 / meswitch base | " + " | ".join(
            f"{tps['meswitch mixed16'][b] / tps['meswitch base'][b]:.2f}x" for b in bs) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Grouped bars: tokens/s per row at each batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(BATCHES))]
        ax.bar(xs, [r["tokens_per_s"][row][str(b)] for b in BATCHES], width, label=row)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BATCHES))], [f"batch {b}" for b in BATCHES])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"llama.cpp and meswitch on {r['gguf']} ({r['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""How compressing one expert's memory grows with the number of decoder blocks N.

For each N, a random base of SmolLM2-135M's width (hidden 576, MLP 1536, vocabulary 49,152, tied
embeddings) with N blocks and an expert (every weight moved, as a fine-tune does) are saved as
safetensors (the expert in bf16, sharded, as fine-tunes are usually saved), then one ``meswitch
compress`` of the expert at the default setting runs in a fresh process that samples its memory
every 10 ms: RSS split into anonymous pages (the process's own: the base it writes the deltas into,
the working set, calibration activations) and file pages (the memory-mapped float32 weights, which
the kernel may drop and read back). The fit over N gives each part's bytes per block against one
block's float32 bytes.

    python benchmarks/compress_scaling.py [--blocks 2,4,8,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402

WIDTH = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
         "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 2048}

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in peak:
                out[k] = int(v.split()[0]) * 1024
    return out
def sample():
    while True:
        now = status()
        if now["VmRSS"] > peak["VmRSS"]:
            peak.update(now)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
import torch, transformers  # noqa: F401  (the runtime, measured below before any model)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from meswitch.compress.config import CompressConfig
from meswitch.data.examples import read_jsonl
from meswitch.jobs.compress_store import compress_into_store
from meswitch.utils.memory import map_large_allocations
map_large_allocations(256 << 10)  # as `meswitch compress` does
root = Path(sys.argv[1])
runtime = status()  # interpreter, torch, transformers imported
t0 = time.perf_counter()
compress_into_store(root / "base", {"x": root / "expert"}, root / "store", read_jsonl(root / "calib.jsonl"),
                    CompressConfig(calib_blocks=8, hessian_blocks=8, eval_blocks=2, calib_len=256))
print(json.dumps({"peak": peak, "runtime": runtime, "seconds": time.perf_counter() - t0}))
"""


def build(root: Path, n: int) -> dict[str, int]:
    """Save the N-block base (fp32, with the packaged tokenizer), the bf16 expert and calibration text."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from meswitch.data.examples import Example, write_jsonl
    from meswitch.model.checkpoint import save_checkpoint
    from meswitch.zoo.build import ensure_source_base

    torch.manual_seed(n)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, **WIDTH)).eval()
    save_checkpoint(base, AutoTokenizer.from_pretrained(ensure_source_base()), root / "base", {"blocks": n})
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.02)
    base.to(torch.bfloat16).save_pretrained(root / "expert", max_shard_size="100MB")
    text = sorted(Path(os.__file__).parent.glob("*.py"))[:60]  # any text: memory, not quality, is measured
    write_jsonl(root / "calib.jsonl", [Example(p.read_text(errors="replace")[:6000], "text") for p in text])
    block = sum(p.numel() for p in base.model.layers[0].parameters()) * 4
    return {"model_bytes": sum(p.numel() for p in base.parameters()) * 4, "block_bytes": block}


def fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: (a, b)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,4,8,16")
    ap.add_argument("--json", type=Path, default=results_dir() / "compress_scaling.json")
    args = ap.parse_args()
    rows = []
    for n in (int(b) for b in args.blocks.split(",")):
        with tempfile.TemporaryDirectory(prefix="meswitch-scaling-") as tmp:
            sizes = build(Path(tmp), n)
            out = subprocess.run([sys.executable, "-c", CHILD, tmp], capture_output=True, text=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"})
            if out.returncode:
                sys.stderr.write(out.stderr)
                return out.returncode
            rows.append({"blocks": n, **sizes, **json.loads(out.stdout.strip().splitlines()[-1])})
        r = rows[-1]
        print(f"N={n}: peak RSS {r['peak']['VmRSS'] / 2**20:.0f} MiB, {r['seconds']:.0f} s", flush=True)
    mib = 2**20
    print(f"\n{'blocks':>6} {'model MiB':>9} {'peak RSS':>8} {'anon':>6} {'file':>6} {'anon-runtime':>12} "
          f"{'seconds':>7}")
    for r in rows:
        p = r["peak"]
        print(f"{r['blocks']:>6} {r['model_bytes'] / mib:9.0f} {p['VmRSS'] / mib:8.0f} {p['RssAnon'] / mib:6.0f} "
              f"{p['RssFile'] / mib:6.0f} {(p['RssAnon'] - r['runtime']['RssAnon']) / mib:12.0f} "
              f"{r['seconds']:7.0f}")
    block = rows[0]["block_bytes"]
    ns = [r["blocks"] for r in rows]
    slopes = {}
    for key in ("VmRSS", "RssAnon", "RssFile"):
        a, b = fit(ns, [r["peak"][key] for r in rows])
        slopes[key] = {"intercept_bytes": a, "per_block_bytes": b, "per_block_in_blocks": b / block}
        print(f"{key:>8}: {a / mib:6.0f} MiB + {b / mib:5.1f} MiB per block = {b / block:.2f} x one block's "
              f"float32 bytes ({block / mib:.1f} MiB)")
    args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "fit": slopes}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

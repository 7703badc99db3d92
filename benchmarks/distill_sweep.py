"""Distillation steps and learning rate of the default (gptq-mixed at 1.5 bits) on one full-zoo expert.

The GPTQ statistics and the 1/2/3-bit ladder are computed once; each (steps, lr) setting then
allocates, distils and is scored on the expert's own held-out text exactly as
``benchmarks/compression.py`` scores its settings (12 examples, KL / top-1 / ppl ratio).

    python benchmarks/distill_sweep.py --expert math --settings '[[20, 0.002], [20, 0.01], [60, 0.005]]'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="full")
    ap.add_argument("--expert", default="math")
    ap.add_argument("--settings", default="[[20, 0.002], [20, 0.01]]", help="JSON list of [steps, lr]")
    ap.add_argument("--limit", type=int, default=12, help="held-out examples")
    args = ap.parse_args(argv)

    from meswitch.compress.config import CompressConfig
    from meswitch.compress.pipeline import compress_model, expert_hessians
    from meswitch.data.chat import padded_batches
    from meswitch.data.examples import read_jsonl
    from meswitch.eval.fidelity import compare_to_states, reference_states
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.zoo.build import ZooPaths, build_zoo, expert_calibration, zoo_dir
    from meswitch.zoo.recipe import get_recipe

    domain = dict(get_recipe(args.zoo).experts)[args.expert]
    build_zoo(args.zoo)  # a no-op when cached
    paths = ZooPaths(zoo_dir(args.zoo))
    base, tok = load_checkpoint(paths.base)
    expert, _ = load_checkpoint(paths.expert(args.expert))
    states = reference_states(expert, padded_batches(read_jsonl(paths.split(domain, "test"))[: args.limit], tok, 512, 4))
    calib = read_jsonl(expert_calibration(args.zoo, paths)[args.expert])
    hess = expert_hessians(expert, tok, calib, CompressConfig())
    rungs: dict = {}  # the ladder's encodings, shared by every setting
    for steps, lr in json.loads(args.settings):
        student = copy.deepcopy(base)
        t0 = time.perf_counter()
        _, _, info = compress_model(student, expert, tok, calib, CompressConfig(distill_steps=steps, distill_lr=lr),
                                    hessians=hess, rung_cache=rungs)
        fid = compare_to_states(states, expert.get_output_embeddings(), student)
        print(json.dumps({"expert": args.expert, "steps": steps, "lr": lr, "bits": round(info["bits_per_param"], 4),
                          "kl": fid.kl, "top1": fid.top1, "ppl_ratio": fid.ppl_ratio,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        del student
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of ``meswitch compress`` for one expert, phase by phase, against the resident models.

Runs the command in this process with its own settings (the CLI's heap policy included), samples
RSS (anonymous and file-backed pages) every 10 ms and marks each phase: the gradient pass, the GPTQ
walk, the global choice, distillation, writing the deltas into the base, the fidelity check, the
store write. The floor is what the process holds once both models are resident (read as the gradient
pass ends: every weight has been touched); the goal is a peak within base + expert + 20% above it.

    python benchmarks/compress_memory.py [--zoo full|small] [--expert math] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path


def status() -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PhaseSampler:
    """Highest RSS seen per phase; :meth:`wrap` makes a function mark its own phase while it runs."""

    def __init__(self) -> None:
        self.phase = "loading, between phases"
        self.peaks: dict[str, dict[str, int]] = {}
        self.starts: dict[str, dict[str, int]] = {}
        self.ends: dict[str, dict[str, int]] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            now, phase = status(), self.phase
            if now["VmRSS"] > self.peaks.get(phase, {}).get("VmRSS", -1):
                self.peaks[phase] = now
            time.sleep(0.01)

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def marked(*args, **kwargs):
            outer, self.phase = self.phase, phase
            self.starts.setdefault(phase, status())
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = outer
                self.ends[phase] = status()

        setattr(owner, attr, marked)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="full", choices=["full", "small"])
    ap.add_argument("--expert", default="math")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import meswitch.compress.allocate as allocate
    import meswitch.compress.distill as distill
    import meswitch.compress.pipeline as pipeline
    import meswitch.deltas.apply as apply
    import meswitch.eval.fidelity as fidelity
    from meswitch.cli import main as cli
    from meswitch.store.store import DeltaStore
    from meswitch.zoo.build import ZooPaths, zoo_dir

    paths = ZooPaths(zoo_dir(args.zoo))
    models = sum(f.stat().st_size for d in (paths.base, paths.expert(args.expert)) for f in d.glob("*.safetensors"))
    sampler = PhaseSampler()
    sampler.wrap(pipeline, "_gptq_walk", "GPTQ walk")  # nested phases below mark themselves
    sampler.wrap(pipeline, "collect_output_grad_sq", "gradient pass")
    sampler.wrap(allocate, "choose", "global choice")
    sampler.wrap(distill, "tune_grids", "distillation")
    sampler.wrap(apply, "apply_delta", "deltas into the base")
    sampler.wrap(fidelity, "compare_models", "fidelity check")
    sampler.wrap(DeltaStore, "add_expert", "store write")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rc = cli(["compress", "--zoo", args.zoo, "--expert", f"{args.expert}={paths.expert(args.expert)}",
                  "--out", str(Path(tmp) / "store")])
    seconds = time.perf_counter() - t0
    floor = (sampler.ends.get("gradient pass") or status())["VmRSS"]
    peak_phase, peak = max(sampler.peaks.items(), key=lambda kv: kv[1]["VmRSS"])
    print(f"\nbase + expert: {models / 1e9:.3f} GB of safetensors; floor (models resident + runtime, read as "
          f"the gradient pass ends): {floor / 1e9:.3f} GB; {seconds / 60:.1f} min")
    print(f"{'phase':<22} {'peak GB':>8} {'anon':>6} {'file':>6} {'over floor':>11}")
    for phase, p in sampler.peaks.items():
        print(f"{phase:<22} {p['VmRSS'] / 1e9:8.3f} {p['RssAnon'] / 1e9:6.3f} {p['RssFile'] / 1e9:6.3f} "
              f"{(p['VmRSS'] - floor) / models:10.1%}")
    over = (peak["VmRSS"] - floor) / models
    print(f"peak {peak['VmRSS'] / 1e9:.3f} GB in {peak_phase}: {over:.1%} of base + expert over the floor "
          f"(goal <= 20%: {'met' if over <= 0.2 else 'not met'})")
    if args.json:
        args.json.write_text(json.dumps({"models_bytes": models, "floor_bytes": floor, "seconds": seconds,
                                         "peaks": sampler.peaks, "over_floor_fraction": over}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())

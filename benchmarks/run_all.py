"""``make bench``: every benchmark on the full zoo, one after another, then docs/RESULTS.md.

Each step runs as its own process (a crash or a missing optional dependency fails that step, not the
run), with its output on the console and in ``~/.cache/meswitch/bench/<step>.log``. Steps run alone:
on a small machine two benchmarks at once would measure each other. The steps' statuses and times go
to docs/results/bench_run.json, which the report quotes; the report is written even when a step
failed (its section then shows the previous result or "not measured"), and the exit status says so.

    python benchmarks/run_all.py [--store DIR] [--only a,b] [--skip a,b] [--list] [--results DIR] [--report FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import results_dir  # noqa: E402

from meswitch.paths import cache_root  # noqa: E402

HERE = Path(__file__).resolve().parent
# The compression settings the report compares: every method at 1-4 bits, the peers' BitDelta with its
# distillation and ME-Switch at its best setting, GPTQ and the mixed GPTQ budgets; the ablations (clip,
# asymmetric grids, the older mixed ladder) are left to `python benchmarks/compression.py` without --settings.
COMPRESSION_SETTINGS = ("rtn-1,rtn-2,rtn-3,rtn-4,bitdelta,bitdelta+distill,salient-1,salient-2,salient-3,"
                        "salient-2@2.1,sign2d-1@1.5,gptq-1,gptq-2,gptq-mixed@1.25,gptq-mixed@1.5,default")


@dataclass
class Step:
    name: str
    argv: list[str]
    needs: str | None = None  # a module that must be importable, else the step is skipped


def steps(store: Path) -> list[Step]:
    py = sys.executable
    return [
        Step("prepare", [py, "-m", "meswitch", "demo", "--prepare", "--store", str(store)]),
        Step("compression", [py, str(HERE / "compression.py"), "--zoo", "full", "--settings", COMPRESSION_SETTINGS]),
        Step("engine", [py, str(HERE / "engine.py"), "--store", str(store)]),
        Step("cpu_kernels", [py, str(HERE / "cpu_delta_kernels.py")]),
        Step("kernel_fidelity", [py, str(HERE / "kernel_fidelity.py"), "--store", str(store)]),
        Step("router", [py, str(HERE / "router.py"), "--store", str(store)], needs="sentence_transformers"),
        Step("load", [py, str(HERE / "load.py"), "--store", str(store), "--clients", "8", "--seconds", "60"],
             needs="openai"),
        Step("ray_scale", [py, str(HERE / "ray_scale.py"), "--store", str(store)], needs="ray"),
        # issue 19's table: each expert on its domain's tasks at the default, GPTQ 1/2/3 bits and BitDelta
        # (stores built next to STORE), the uncompressed experts through lm-eval's hf model, base and auto
        Step("tasks", [py, str(HERE / "tasks.py"), "--by-domain", "--sweep", "--hf", "--store", str(store),
                       "--limit", "50"], needs="lm_eval"),
        # 16, 100 and 1000 synthetic experts over the full base (~24 GB of store on disk, built once and
        # cached; ~30 min the first time): leave it out with --skip scale, or run it alone with --only scale
        Step("scale", [py, str(HERE / "scale.py")], needs="openai"),
        # llama.cpp on the same GGUF beside meswitch's base and 16 experts (`make llamacpp` installs it)
        Step("llamacpp", [py, str(HERE / "llamacpp.py"), "--store", str(store)], needs="llama_cpp"),
    ]


def run_step(step: Step, log_dir: Path) -> dict:
    """Run one step, streaming its output to the console and its log; its status and wall time."""
    cmd = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(step.argv))
    if step.argv[1:2] and step.argv[1].endswith(".py") and not Path(step.argv[1]).is_file():
        return {"name": step.name, "status": "skipped (script missing)", "seconds": 0.0, "command": cmd}
    if step.needs and importlib.util.find_spec(step.needs) is None:
        return {"name": step.name, "status": f"skipped ({step.needs} not installed)", "seconds": 0.0, "command": cmd}
    log = log_dir / f"{step.name}.log"
    print(f"\n=== {step.name}: {cmd}  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    status = "ok" if rc == 0 else f"failed (exit {rc}; see {log})"
    print(f"=== {step.name}: {status} in {seconds / 60:.1f} min", flush=True)
    # the 1-minute load average at the end: above the core count, something else shared the machine
    return {"name": step.name, "status": status, "seconds": seconds, "command": cmd,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg": os.getloadavg()[0]}


def merge_steps(path: Path, done: list[dict], names: list[str]) -> list[dict]:
    """This run's steps, plus the previous run's record of the steps it left out (``--only``/``--skip``)."""
    previous = {}
    if path.is_file():
        try:
            previous = {s["name"]: s for s in json.loads(path.read_text()).get("steps", [])}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            previous = {}
    now = {s["name"]: s for s in done}
    return [now.get(n) or previous[n] for n in names if n in now or n in previous]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=cache_root() / "stores" / "full")
    ap.add_argument("--only", help="comma-separated steps to run (default: all)")
    ap.add_argument("--skip", help="comma-separated steps to leave out")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--results", type=Path, default=results_dir(), help="where the benchmarks write their JSON")
    ap.add_argument("--report", type=Path, default=HERE.parent / "docs" / "RESULTS.md")
    args = ap.parse_args(argv)
    plan = steps(args.store.expanduser())
    names = [s.name for s in plan]
    chosen = set(args.only.split(",")) if args.only else set(names)
    chosen -= set(args.skip.split(",")) if args.skip else set()
    if unknown := sorted(chosen - set(names)):
        ap.error(f"unknown steps {unknown}; the steps are {', '.join(names)}")
    if args.list:
        for s in plan:
            print(f"{s.name:12s} {' '.join(s.argv)}")
        return 0
    log_dir = cache_root() / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = [run_step(s, log_dir) for s in plan if s.name in chosen]
    merged = merge_steps(args.results / "bench_run.json", done, names)
    # total_s sums every recorded step, including those kept from earlier --only runs;
    # this_run_s is what this invocation took.
    record = {"steps": merged, "total_s": sum(s.get("seconds", 0.0) for s in merged),
              "this_run_s": time.perf_counter() - t0, "store": str(args.store)}
    (args.results / "bench_run.json").write_text(json.dumps(record, indent=2))
    report = subprocess.run([sys.executable, str(HERE / "report.py"), "--store", str(args.store),
                             "--results", str(args.results), "--out", str(args.report)])
    failed = [s["name"] for s in done if s["status"].startswith("failed")]
    print(f"\nmake bench: {len(done)} steps in {record['this_run_s'] / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; all ok"))
    return 1 if failed or report.returncode else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""benchmarks/tasks.py --by-domain: which tasks judge which expert, the targets' verdicts, the table and plot."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import tasks as bench_tasks  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(value: float, stderr: float | None = 0.05) -> dict:
    return {"value": value, "stderr": stderr, "metric": "acc_norm"}


def test_domain_tasks_by_name_spec_and_availability():
    plan = bench_tasks.domain_tasks(["code", "math", "chat-lora"], None)
    assert plan == {"code": ["meswitch_humaneval", "meswitch_mc_code"],
                    "math": ["meswitch_gsm_symbolic", "meswitch_mc_math"]}  # no domain: left out
    plan = bench_tasks.domain_tasks(["code", "math"], None, installed=lambda t: t in {"meswitch_mc_code", "meswitch_mc_math"})
    assert plan == {"code": ["meswitch_mc_code"], "math": ["meswitch_mc_math"]}  # HumanEval not installed
    plan = bench_tasks.domain_tasks(["sql", "math"], "sql=meswitch_mc_code+meswitch_tiny_mc")
    assert plan == {"sql": ["meswitch_mc_code", "meswitch_tiny_mc"]}


def _runs() -> tuple[dict, list[dict], dict]:
    plan = {"math": ["t_gen", "t_mc"], "general": ["t_chat"]}
    default = {"store": "/s/full", "experts": {"math": {"t_gen": _row(0.30), "t_mc": _row(0.62)},
                                               "general": {"t_chat": _row(0.50, 0.004)}},
               "bits": {"math": 1.5, "general": 1.5}, "method": {"math": "gptq-mixed", "general": "gptq-mixed"},
               "base": {"t_gen": _row(0.10), "t_mc": _row(0.40), "t_chat": _row(0.45)},
               "auto": {"t_gen": _row(0.28), "t_mc": _row(0.62), "t_chat": _row(0.49, 0.004)}}
    low = {"store": "/s/full-bitdelta", "experts": {"math": {"t_gen": _row(0.20), "t_mc": _row(0.55)},
                                                    "general": {"t_chat": _row(0.47)}},
           "bits": {"math": 1.0, "general": 1.0}, "method": {"math": "bitdelta+distill", "general": "bitdelta+distill"},
           "base": None, "auto": None}
    hf = {"experts": {"math": {"t_gen": _row(0.32, 0.06), "t_mc": _row(0.70, 0.05)},
                      "general": {"t_chat": _row(0.52, 0.004)}}}
    return plan, [default, low], hf


def test_domain_checks_apply_the_larger_of_stderr_and_one_point():
    plan, runs, hf = _runs()
    lines = bench_tasks.domain_checks(plan, runs[0], hf)
    by_task = {line.split()[1]: line for line in lines if not line.startswith("- auto")}
    assert "-2.0 points, within the tolerance 6.0" in by_task["t_gen"]      # 2 points down, stderr 6 points
    assert "-8.0 points, NOT within the tolerance 5.0" in by_task["t_mc"]   # 8 down, stderr 5
    assert "-2.0 points, NOT within the tolerance 1.0" in by_task["t_chat"]  # stderr 0.4 < 1 point: 1 point rules
    auto = next(line for line in lines if line.startswith("- auto"))
    # math: mean of (-2, 0) = -1; general: -1; summed over the domains: -2
    assert "-2.0 points summed over the domains (math -1.0, general -1.0" in auto


def test_domain_table_and_plot(tmp_path):
    plan, runs, hf = _runs()
    md = bench_tasks.domain_table(plan, runs, hf).splitlines()
    assert md[0] == "| model | bits/param | t_gen | t_mc | t_chat |"
    assert md[2].startswith("| base (no delta) | 0 | 0.100 ± 0.050 |")
    assert md[3].startswith("| uncompressed expert (lm-eval hf) | 16 | 0.320 ± 0.060 | 0.700 ± 0.050 | 0.520 ± 0.004 |")
    assert md[4] == "| full: gptq-mixed (default) | 1.500 | 0.300 ± 0.050 | 0.620 ± 0.050 | 0.500 ± 0.004 |"
    assert md[5].startswith("| full-bitdelta: bitdelta+distill | 1.000 | 0.200 ± 0.050 |")
    assert md[6].startswith("| auto (full, routed) | - | 0.280 ± 0.050 |")
    png = tmp_path / "bits.png"
    assert bench_tasks.domain_plot(plan, runs, hf, png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert not bench_tasks.domain_plot(plan, runs[:1], hf, tmp_path / "one.png")  # one store: nothing to plot

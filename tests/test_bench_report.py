"""`make bench`'s report and runner: RESULTS.md from benchmark JSON, plots, failures reported, not hidden."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run_all  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _compression() -> dict:
    rows = []
    for expert in ("code", "math"):
        for setting, method, bits, kl, ppl in (("rtn-2", "rtn", 2.02, 1e-3, 1.01), ("default", "default", 2.09, 4e-5, 1.002)):
            rows.append({"expert": expert, "setting": setting, "method": method, "bits": 2, "bits_per_param": bits,
                         "kl": kl * (2 if expert == "math" else 1), "top1": 0.99, "ppl_ratio": ppl + (0.01 if expert == "math" else 0),
                         "tokens": 100, "compress_s": 10.0, "peak_rss_bytes": 2**30, "ratio_vs_fp16": 16 / bits})
    return {"zoo": "full", "machine": "test", "distill_steps": 5, "held_out_examples": 4, "base_fp32_bytes": 4, "rows": rows}


def _engine() -> dict:
    tps = {"base": {"1": 20.0, "16": 100.0}, "one": {"1": 18.0, "16": 80.0}, "mixed3": {"1": 17.0, "16": 70.0},
           "mixed16": {"1": 16.0, "16": 50.0}}
    mem = {"1": {"full_models": 4 * 2**20, "packed": 5 * 2**20, "packed+int4": 6 * 2**20},
           "3": {"full_models": 12 * 2**20, "packed": 6 * 2**20, "packed+int4": 8 * 2**20}}
    return {"machine": "test", "threads": 2, "tokens_per_s": {"default": tps}, "memory_bytes": mem,
            "load_ms": {"default": {"a": [100.0], "b": [300.0], "c": [200.0]}},
            "swap": {"tokens_per_s": 10.0, "load_s_mean": 0.4}, "traffic": {"together": 40.0, "one_by_one": 9.0}}


def _router() -> list:
    conf = {"code": {"code": 9, "math": 1}, "math": {"math": 10}}
    res = {"accuracy": 0.95, "ece": 0.02, "fallback_rate": 0.01, "confusion": conf, "latency_ms_p50": 6.5,
           "latency_ms_p99": 9.0}
    return [{"encoder": "minilm", "encoder_bytes": 46 * 2**20, "head_bytes": 2**17, "id": res,
             "oos_all": {**res, "accuracy": 0.91}, "oos": {"code_stubs": {"accuracy": 0.93}}}]


def _write(d: Path, **results) -> None:
    names = {"compression": "compression_full.json", "engine": "engine.json", "router": "router.json"}
    for k, v in results.items():
        (d / names[k]).write_text(json.dumps(v))


def test_report_from_results(tmp_path):
    _write(tmp_path, compression=_compression(), engine=_engine(), router=_router())
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--store", str(tmp_path / "no-store")]) == 0
    text = out.read_text()
    # engine ratios against the base at the same batch: 50 / 100 and 40 / 10 (worked out by hand)
    assert "50.0 (0.50x)" in text and "| meswitch, 16 requests for 16 experts batched | 40.0 | 4.0x |" in text
    assert "median 200 ms over 3 loads" in text
    # compression averaged over experts: KL (4e-5 + 8e-5) / 2, worst perplexity ratio 1.012
    assert "| default | default | 2.090 | 6.00e-05 | 0.9900 | 1.0120 |" in text
    # projections use the default setting's measured bits; Mistral-7B at 2.09 bits: 39 experts in 80 GiB
    assert "2.090 bits per parameter" in text and "fits **39** experts" in text
    assert "| minilm | 0.950 | 0.910 |" in text
    assert "Not measured: `python benchmarks/load.py`." in text
    for name in report.PLOTS.values():
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "## Machine" in text and "cores" in text


def test_report_shows_a_gpu_run(tmp_path):
    gpu = {"device": "NVIDIA H200", "torch": "2.11", "note": "",
           "check": [{"y": "float32", "rel_err": 2e-6}, {"y": "bfloat16", "rel_err": 9e-3}],
           "layers": [{"batch": 16, "experts": 0, "ms": 0.14, "ratio": 1.0, "GBps": 3100.0},
                      {"batch": 16, "experts": 16, "ms": 2.8, "ratio": 0.05, "bound_ratio": 0.4, "GBps": 400.0}],
           "decode": [{"batch": 16, "case": "mixed16", "tok_s": 127.0, "ratio": 0.4}]}
    (tmp_path / "gpu_sgmv.json").write_text(json.dumps(gpu))
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--store", str(tmp_path)]) == 0
    text = out.read_text()
    assert "2 checks against the float32 reference, worst relative error 2.0e-06" in text  # bf16 output excluded
    assert "| 16 | 16 | 2.800 | 0.050x | 0.40x | 400 |" in text and "| 16 | mixed16 | 127.0 | 0.40x |" in text


def test_report_without_results_says_what_to_run(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--store", str(tmp_path)]) == 0
    text = out.read_text()
    for cmd in ("compression.py", "engine.py", "router.py", "load.py", "ray_scale.py", "gpu_sgmv.py",
                "cpu_delta_kernels.py", "kernel_fidelity.py"):
        assert f"Not measured: `python benchmarks/{cmd}`." in text
    assert not list(tmp_path.glob("*.png"))


def test_report_rejects_a_corrupt_result(tmp_path):
    (tmp_path / "engine.json").write_text('{"machine": ')
    with pytest.raises(SystemExit, match="engine.json is not valid JSON"):
        report.main(["--results", str(tmp_path), "--out", str(tmp_path / "R.md")])


def test_runner_reports_failed_and_skipped_steps(tmp_path, monkeypatch, capsys):
    py = sys.executable
    plan = [run_all.Step("good", [py, "-c", "print('hello from good')"]),
            run_all.Step("bad", [py, "-c", "import sys; sys.exit(3)"]),
            run_all.Step("optional", [py, "-c", "pass"], needs="no_such_module_xyz"),
            run_all.Step("left-out", [py, "-c", "raise SystemExit(9)"])]
    monkeypatch.setattr(run_all, "steps", lambda store: plan)
    monkeypatch.setenv("MESWITCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "RESULTS.md"
    rc = run_all.main(["--results", str(tmp_path), "--report", str(out), "--store", str(tmp_path / "none"),
                       "--skip", "left-out"])
    assert rc == 1
    record = json.loads((tmp_path / "bench_run.json").read_text())
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status["good"] == "ok"
    assert status["bad"].startswith("failed (exit 3")
    assert status["optional"] == "skipped (no_such_module_xyz not installed)"
    assert "left-out" not in status
    assert "hello from good" in (tmp_path / "cache" / "bench" / "good.log").read_text()
    assert "FAILED: bad" in capsys.readouterr().out
    # the report is still written, and it lists the run
    assert "| bad | failed (exit 3" in out.read_text()
    # a later run of one step replaces that step's record and keeps the others'
    plan[1] = run_all.Step("bad", [py, "-c", "pass"])
    assert run_all.main(["--results", str(tmp_path), "--report", str(out), "--store", str(tmp_path / "none"),
                         "--only", "bad"]) == 0
    status = {s["name"]: s["status"] for s in json.loads((tmp_path / "bench_run.json").read_text())["steps"]}
    assert status == {"good": "ok", "bad": "ok", "optional": "skipped (no_such_module_xyz not installed)"}


def test_runner_rejects_unknown_steps(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "compresion"])
    assert "unknown steps ['compresion']" in capsys.readouterr().err


def test_report_shows_the_cpu_kernels_and_their_fidelity(tmp_path):
    kernels = {"machine": "test", "threads": 2, "layers": 30,
               "per_expert_rows": {"5": {"lowbit_1bit_ms": 1.5, "lowbit_2bit_ms": 2.0, "lowbit_3bit_ms": 2.5, "int4_ms": 5.0}},
               "step_3_experts_batch_16": {"lowbit_1bit_ms": 6.0, "lowbit_2bit_ms": 8.0, "lowbit_3bit_ms": 9.0,
                                           "int4_ms": 36.0}}
    fid = {"reference": "exact", "examples": 4,
           "caches": {"lowbit": {"math": {"positions": 176, "kl": 6.5e-7, "top1": 0.9765, "max_abs_logit": 0.014}}}}
    (tmp_path / "cpu_delta_kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "kernel_fidelity.json").write_text(json.dumps(fid))
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--store", str(tmp_path)]) == 0
    text = out.read_text()
    # 5.0 / 2.0 and 36 / 8, worked out by hand
    assert "| 5 | 1.50 | 2.00 | 2.50 | - | 5.00 | 2.50x |" in text and "(one call per expert): 4.5x." in text
    assert "| lowbit | math | 176 | 6.50e-07 | 0.9765 | 0.014 |" in text

"""`meswitch demo` end to end on the small zoo: compress, serve, query through the openai client, report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meswitch.cli.demo import QUERIES


def _demo(store, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220"}
    cmd = [sys.executable, "-m", "meswitch", "demo", "--size", "small", "--store", str(store), "--once", "--port", "0",
           "--max-tokens", "4", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def demo_run(small_zoo, tmp_path_factory):
    """(store, output) of the demo run once on a fresh store."""
    store = tmp_path_factory.mktemp("demo") / "store"
    return store, _demo(store)


@pytest.mark.slow
def test_demo_runs_the_main_job_and_reuses_its_store(demo_run):
    store, first = demo_run
    assert "compress: " in first and "-> " + str(store) in first
    for domain, query in QUERIES.items():
        assert (store / "experts" / f"{domain}.safetensors").is_file()
        row = next(line for line in first.splitlines() if query[:30] in line)
        assert f" {domain} " in row, row  # each domain's query went to (or was routed to) its own expert
    assert "3 full fp16 experts" in first and "smaller" in first
    assert "serving on http://127.0.0.1:" in first
    second = _demo(store)
    assert "already in" in second and "with the same recipe" in second
    assert "compress: math" not in second and "(salient, 2 bits)" not in second


@pytest.mark.slow
def test_serve_command_with_an_api_key_from_the_environment(demo_run):
    import socket
    import time

    import httpx
    import openai

    store = demo_run[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MESWITCH_API_KEY": "k-123"}
    proc = subprocess.Popen([sys.executable, "-m", "meswitch", "serve", str(store), "--port", str(port),
                             "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "meswitch serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="k-123", max_retries=0)
        assert {"math", "code", "general"} <= {m.id for m in client.models.list().data}
        r = client.completions.create(model="code", prompt="def f(x):", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3 and r.model_extra["meswitch"]["expert"] == "code"
    finally:
        proc.terminate()
        proc.wait(30)

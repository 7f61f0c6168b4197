"""Server metrics in the Prometheus text exposition format (version 0.0.4), written here so that
prometheus-client is not needed.

Exposed (``GET /metrics``):

* gauges from the engine's last :meth:`~rast_kernels.RastEngine.stats` (refreshed by the engine loop after
  every step and every abort): ``rast_requests_running`` and ``rast_requests_waiting`` (sequences: a request
  with ``n`` samples counts ``n``), ``rast_kv_blocks_used``, ``rast_kv_blocks_total``, ``rast_kv_block_size``;
  ``rast_requests_queued`` (HTTP requests accepted but not yet handed to the engine);
* with speculative decoding: ``rast_speculative_{rounds,drafted,checked,accepted,emitted}_total`` and the gauge
  ``rast_speculative_tokens_per_round`` (the engine's counts as of its last read window);
* counters: ``rast_generation_tokens_total`` (the engine's count), ``rast_prompt_tokens_total``,
  ``rast_http_requests_total{endpoint,status}``, ``rast_samples_finished_total{reason}``;
* histograms: ``rast_time_to_first_token_seconds`` (per sample, from the HTTP request's arrival to the engine
  reporting its first token) and ``rast_time_per_output_token_seconds`` (per finished sample with >= 2 tokens:
  (last token time - first token time) / (tokens - 1)).

Updated from the engine-loop thread and the event loop, read from the event loop: one lock.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Dict, Sequence

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` buckets, ``+Inf``, ``_sum``, ``_count``)."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list:
        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{bound:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.9g}")
        out.append(f"{name}_count {self.count}")
        return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """The server's metrics registry (module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.http = Counter()  # (endpoint, status) -> count
        self.finished = Counter()  # finish reason -> samples
        self.prompt_tokens = 0
        self.engine_stats: Dict[str, int] = {}
        self.queued = 0

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_finish(self, reason: str, tpot: float | None) -> None:
        with self._lock:
            self.finished[reason or "none"] += 1
            if tpot is not None:
                self.tpot.observe(tpot)

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def count_http(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http[(endpoint, int(status))] += 1

    def set_engine_stats(self, stats: dict, queued: int) -> None:
        with self._lock:
            self.engine_stats = dict(stats)
            self.queued = queued

    def render(self) -> str:
        with self._lock:
            s = dict(self.engine_stats)
            lines = []

            def metric(name, kind, help_, samples):
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(samples)

            # one-value metrics: (name, kind, help, value)
            for name, kind, help_, value in (
                    ("rast_requests_running", "gauge", "Sequences in decode slots.", s.get("running", 0)),
                    ("rast_requests_waiting", "gauge", "Sequences waiting for a decode slot or KV blocks.",
                     s.get("waiting", 0)),
                    ("rast_requests_queued", "gauge", "HTTP requests accepted, not yet handed to the engine.",
                     self.queued),
                    ("rast_kv_blocks_used", "gauge", "KV cache blocks in use.", s.get("kv_blocks_used", 0)),
                    ("rast_kv_blocks_total", "gauge", "KV cache blocks in the pool.", s.get("kv_blocks_total", 0)),
                    ("rast_kv_block_size", "gauge", "Token slots per KV block.", s.get("block_size", 0)),
                    ("rast_generation_tokens_total", "counter", "Tokens generated by the engine.",
                     s.get("tokens_generated", 0)),
                    ("rast_prompt_tokens_total", "counter", "Prompt tokens of the requests handed to the engine.",
                     self.prompt_tokens)):
                metric(name, kind, help_, [f"{name} {value}"])
            if "speculative_rounds" in s:  # an engine with speculative_tokens > 0
                for key, help_ in (("rounds", "Speculative row-rounds (one row, one round)."),
                                   ("drafted", "Tokens the small models drafted."),
                                   ("checked", "Drafts compared with RAST's token (up to the first mismatch)."),
                                   ("accepted", "Drafted tokens accepted (equal to RAST's own token)."),
                                   ("emitted", "Tokens kept by speculative rounds.")):
                    name = f"rast_speculative_{key}_total"
                    metric(name, "counter", help_, [f"{name} {s[f'speculative_{key}']}"])
                metric("rast_speculative_tokens_per_round", "gauge", "Mean tokens kept per row-round so far.",
                       [f"rast_speculative_tokens_per_round {s['speculative_tokens_per_round']:.6g}"])
            metric("rast_http_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [f'rast_http_requests_total{{endpoint="{_escape(e)}",status="{c}"}} {v}'
                    for (e, c), v in sorted(self.http.items())])
            metric("rast_samples_finished_total", "counter", "Samples finished, by finish reason.",
                   [f'rast_samples_finished_total{{reason="{_escape(r)}"}} {v}'
                    for r, v in sorted(self.finished.items())])
            metric("rast_time_to_first_token_seconds", "histogram",
                   "Per sample: HTTP request arrival to its first generated token.",
                   self.ttft.lines("rast_time_to_first_token_seconds"))
            metric("rast_time_per_output_token_seconds", "histogram",
                   "Per finished sample: mean time between its generated tokens.",
                   self.tpot.lines("rast_time_per_output_token_seconds"))
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> Dict[str, float]:
    """``{"name{labels}": value}`` from Prometheus text (comments skipped); for tests and the benchmark."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out

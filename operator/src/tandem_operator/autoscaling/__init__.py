"""Goodput-driven autoscaling: the policy (a pure function), its inputs and a simulator.

* `policy`: `decide(window, current, spec, state, now) -> Decision` and its types;
* `prometheus`: a MetricsWindow from Prometheus' HTTP API (the operator's autoscaler);
* `scrape`: a MetricsWindow from the processes' /metrics directly (`tandem up --autoscale`);
* `latency`, `simulator`: latency models (calibratable) and a discrete-event simulator that runs
  the same policy over a request trace (benchmarks/simulate_autoscaling.py).

Standard library only: the operator imports it, and so can `tandem up --autoscale`.
"""

from .latency import LatencyModel
from .policy import AutoscalingSpec, Decision, MetricsWindow, PolicyState, Replicas, decide
from .prometheus import PrometheusError, fetch_window
from .scrape import DirectScraper
from .simulator import SimConfig, SimResult, TraceRequest, load_azure_trace, simulate, static_peak_size

__all__ = [
    "AutoscalingSpec",
    "Decision",
    "DirectScraper",
    "LatencyModel",
    "MetricsWindow",
    "PolicyState",
    "PrometheusError",
    "Replicas",
    "SimConfig",
    "SimResult",
    "TraceRequest",
    "decide",
    "fetch_window",
    "load_azure_trace",
    "simulate",
    "static_peak_size",
]

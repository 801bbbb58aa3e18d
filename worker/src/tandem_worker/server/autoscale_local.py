"""`tandem up --autoscale`: the operator's autoscaling policy, closed over local worker processes.

Every `scrape_every` seconds the router's and workers' /metrics are read (no Prometheus server
needed: `DirectScraper` computes the same window the operator's PromQL does), or, given a
Prometheus URL, the window comes from Prometheus exactly as the operator gets it (`fetch_window`,
with the deployment's `targets.json` in Prometheus' file_sd_configs); every
`decide_every` seconds `tandem_operator.autoscaling.policy.decide` (the very function the operator
runs) picks the prefill and decode sizes, and `LocalDeployment.scale` starts workers or drains
them. The loop runs on the supervisor's main thread: children must be started from it (see
`popen_dying_with_parent`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .local import LocalDeployment


@dataclass
class LocalAutoscaler:
    deployment: LocalDeployment
    spec: Any  # tandem_operator.autoscaling.policy.AutoscalingSpec
    decide_every: float = 5.0
    scrape_every: float = 2.0
    decisions: list[Any] = field(default_factory=list)  # every Decision that changed a size
    prometheus_url: str | None = None
    scrape_interval: float = 15.0  # of that Prometheus: its rate windows span at least 4

    def __post_init__(self) -> None:
        from tandem_operator.autoscaling.policy import PolicyState
        from tandem_operator.autoscaling.scrape import DirectScraper

        self.state = PolicyState()
        self.scraper = DirectScraper(
            self.deployment.router_metrics_url(),
            window_s=self.spec.window_seconds,
            sub_window_s=max(self.scrape_every, self.spec.window_seconds / 4),
        )
        self._last_scrape = self._last_decision = float("-inf")
        self._holding: str | None = None  # what was last said about holding

    def tick(self, now: float | None = None) -> None:
        from tandem_operator.autoscaling.policy import Replicas, decide, holding_reason

        now = time.monotonic() if now is None else now
        d = self.deployment
        d.poll()
        if now - self._last_scrape >= self.scrape_every:
            self._last_scrape = now
            self.scraper.set_workers(d.worker_metrics_urls())
            try:
                self.scraper.scrape(now)
            except Exception as e:  # noqa: BLE001 - a missed scrape only thins the window
                print(f"tandem up: autoscaler could not scrape metrics: {e}", flush=True)
        if now - self._last_decision < self.decide_every:
            return
        self._last_decision = now
        current = Replicas(
            prefill=d.target("prefill"),
            decode=d.target("decode"),
            prefill_ready=d.ready("prefill"),
            decode_ready=d.ready("decode"),
        )
        if self.prometheus_url:
            from tandem_operator.autoscaling.prometheus import PrometheusError, fetch_window

            from .local import PROMETHEUS_DEPLOYMENT_LABEL

            try:
                window = fetch_window(
                    self.prometheus_url,
                    self.spec.window_seconds,
                    selector=f'deployment="{PROMETHEUS_DEPLOYMENT_LABEL}"',
                    sub_window_s=max(2.0, self.spec.window_seconds / 4),
                    step_s=1.0,
                    scrape_interval_s=self.scrape_interval,
                )
            except PrometheusError as e:  # hold the current sizes, as the operator does
                print(f"tandem up: autoscaler holds: Prometheus unavailable: {e}", flush=True)
                return
        else:
            window = self.scraper.window(now)
        decision = decide(window, current, self.spec, self.state, now)
        # Said once per situation: holding silently (the first 20 finished requests of a window by
        # default) read as an autoscaler that did nothing.
        holding = holding_reason(
            decision, window, "Prometheus" if self.prometheus_url else "the processes' /metrics"
        )
        if holding != self._holding and holding is not None:
            print(f"tandem up: autoscaler: {holding}", flush=True)
        self._holding = holding
        if (decision.desired_prefill, decision.desired_decode) != (current.prefill, current.decode):
            self.decisions.append(decision)
            print(
                f"tandem up: autoscale prefill {current.prefill} -> {decision.desired_prefill}, "
                f"decode {current.decode} -> {decision.desired_decode}: {decision.reason}",
                flush=True,
            )
            d.scale("prefill", decision.desired_prefill)
            d.scale("decode", decision.desired_decode)

"""`tandem up --autoscale`'s loop (LocalAutoscaler) over a stand-in for the local deployment."""

from __future__ import annotations

from tandem_operator.autoscaling.policy import AutoscalingSpec
from tandem_worker.server.autoscale_local import LocalAutoscaler


class NoMetricsDeployment:
    """Workers and a router whose /metrics nobody answers (port 9 on loopback: discard, closed)."""

    def __init__(self) -> None:
        self.scaled: list[tuple[str, int]] = []

    def router_metrics_url(self) -> str:
        return "http://127.0.0.1:9/metrics"

    def worker_metrics_urls(self) -> dict[str, str]:
        return {}

    def poll(self) -> None:
        pass

    def target(self, role: str) -> int:
        return 1

    def ready(self, role: str) -> int:
        return 1

    def scale(self, role: str, n: int) -> None:
        self.scaled.append((role, n))


def test_holding_for_want_of_data_is_said_once(capsys):
    # It held silently (no metrics yet, or fewer than 20 finished requests in the window), which
    # read as an autoscaler that did nothing.
    deployment = NoMetricsDeployment()
    scaler = LocalAutoscaler(deployment, AutoscalingSpec(window_seconds=10), decide_every=5, scrape_every=2)
    for t in range(0, 60, 5):
        scaler.tick(now=float(t))
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "holding" in line]
    assert said == [
        "tandem up: autoscaler: no metrics for this deployment in the processes' /metrics: "
        "holding prefill, decode"
    ]
    assert deployment.scaled == []

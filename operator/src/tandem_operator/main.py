"""`tandem operator` (and `tandem-operator`): run the Kopf operator.

Scope: `--namespace` (repeatable; Kopf glob patterns allowed) or `--all-namespaces`.
Liveness: Kopf's probe endpoint (`--liveness`, default http://0.0.0.0:8080/healthz).
Autoscaling: `--autoscale-interval` (default 15 s; 0: off) and `--prometheus-url` (default
$TANDEM_PROMETHEUS_URL), see autoscaler.py.
Peering: replicas share a peering object (`--peering`); each picks a random priority, so exactly one
acts and the others stand by (Kopf pauses the lower priorities). `--standalone` turns peering off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_PEERING = "tandem-operator"


def add_arguments(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument(
        "--liveness", default=DEFAULT_LIVENESS, help=f"liveness endpoint (default {DEFAULT_LIVENESS})"
    )
    p.add_argument("--peering", default=DEFAULT_PEERING, help="peering object shared by replicas")
    p.add_argument("--standalone", action="store_true", help="no peering (only ever run one replica)")
    p.add_argument("--priority", type=int, default=None, help="peering priority (default: random)")
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="periodic reconcile interval in seconds (default 60; 0: off)",
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("TANDEM_PROMETHEUS_URL", ""),
        help="Prometheus HTTP API base URL the autoscaler reads (default: $TANDEM_PROMETHEUS_URL; "
        "empty: autoscaled pools hold their size and status says so)",
    )
    p.add_argument(
        "--autoscale-interval",
        type=float,
        default=15.0,
        help="seconds between autoscaler steps per ModelDeployment (default 15; 0: no autoscaler, "
        "the spec's replicas stay in force)",
    )
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=15.0,
        help="seconds between Prometheus' scrapes of Tandem's pods (default 15, the chart's monitors): "
        "the autoscaler's rate windows span at least 4 of them",
    )
    p.add_argument("--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem-operator", description="Tandem's ModelDeployment operator")
    add_arguments(p)
    return p


async def operate(
    args: argparse.Namespace, stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None
) -> None:
    """Run until `stop_flag` is set (or a signal arrives): usable in-process (tests) and from `run`."""
    import kopf

    from .handlers import build_settings, register

    registry = kopf.OperatorRegistry()
    register(
        registry,
        resync_seconds=args.resync_seconds,
        autoscale_interval=args.autoscale_interval,
        prometheus_url=args.prometheus_url,
        scrape_interval=args.scrape_interval,
    )
    # Equal priorities make Kopf pause every replica; a random one elects a single active replica.
    priority = args.priority if args.priority is not None else random.randint(1, 1_000_000)
    await kopf.operator(
        registry=registry,
        settings=build_settings(list(args.namespace), bool(args.all_namespaces)),
        clusterwide=bool(args.all_namespaces),
        namespaces=list(args.namespace),
        standalone=bool(args.standalone),
        priority=priority,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness or None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=kopf.Memo(),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import kopf

    from .handlers import login

    # Checked once before Kopf starts: without credentials Kopf logs a traceback and retries the
    # login every minute for ever, which reads as a crash loop rather than a missing setting.
    try:
        login(kopf.OperatorSettings())
    except kopf.LoginError as e:
        print(f"tandem operator: error: {e} (set KUBECONFIG, or run it in a pod)", file=sys.stderr)
        return 2
    try:
        asyncio.run(operate(args))
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

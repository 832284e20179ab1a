"""`python -m deepseek_operator` (or `deepseek-operator`): run the operator.

    deepseek-operator                         # all namespaces, leader election by kopf peering
    deepseek-operator --standalone            # no peering (tests, a single replica)
    deepseek-operator --namespace llm --namespace llm-canary
    deepseek-operator --peering dsop --priority 100 --liveness http://0.0.0.0:8080/healthz
    deepseek-operator --resync-period 60      # reconcile every object at least once a minute

Leader election: kopf peering lets only the highest-priority operator of one peering name act; the
others pause until it stops renewing (60 s). Without --priority each replica draws a random one,
so exactly one replica of a Deployment is active. It needs the peering CRDs of
crds/kopf-peering.yaml and a ClusterKopfPeering (or, with --namespace, a KopfPeering per
namespace) named like --peering. Until they exist kopf waits; the operator says so at start and
every minute ($DSOP_PEERING_REPORT_SECONDS) with the command that ends the wait.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence

import kopf

from .. import __version__
from . import handlers, metrics
from .k8s import Kube, new_api_client
from .leadership import describe_peering, outranking_peers, peering_wait_message
from .reconcile import DEFAULT_RESYNC_SECONDS, Reconciler

DEFAULT_PEERING = "deepseek-operator"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 8081
PEERING_REPORT_SECONDS = 60.0

log = logging.getLogger("deepseek_operator.peering")


def seconds(text: str) -> float:
    """A non-negative number of seconds (argparse type; also parses the environment default)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deepseek-operator",
        description="Kubernetes operator that shards and serves DeepSeek MoE models.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="serve only this namespace (repeatable; glob patterns allowed)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="serve every namespace (default)"
    )
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument(
        "--standalone", action="store_true", help="no peering: act alone, no leader election"
    )
    peer.add_argument(
        "--peering",
        default=os.environ.get("DSOP_PEERING", DEFAULT_PEERING),
        help=f"kopf peering name for leader election (default {DEFAULT_PEERING})",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest acts (default: random per process)",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("DSOP_LIVENESS", DEFAULT_LIVENESS),
        help=f"kopf liveness endpoint URL; 'off' disables (default {DEFAULT_LIVENESS})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("DSOP_METRICS_PORT", DEFAULT_METRICS_PORT)),
        help=f"port of the Prometheus /metrics endpoint; 0 disables (default {DEFAULT_METRICS_PORT})",
    )
    parser.add_argument(
        "--metrics-address", default="0.0.0.0", help="bind address of the /metrics endpoint"
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="parallel reconciles (threads) (default 8)"
    )
    parser.add_argument(
        "--resync-period",
        type=seconds,
        # A string default goes through type= too, so a bad $DSOP_RESYNC_PERIOD is a usage error.
        default=os.environ.get("DSOP_RESYNC_PERIOD", f"{DEFAULT_RESYNC_SECONDS:g}"),
        metavar="SECONDS",
        help="reconcile every DeepSeekDeployment again this long after its last reconcile, with "
        "no event needed, to repair drift no watch reports; 0 disables "
        f"(env DSOP_RESYNC_PERIOD; default {DEFAULT_RESYNC_SECONDS:g})",
    )
    parser.add_argument("--kubeconfig", default=None, help="default: in-cluster, else $KUBECONFIG")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf logs in through the same kubeconfig
    kopf.configure(verbose=args.verbose, quiet=args.quiet)
    logging.getLogger("deepseek_operator").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    )
    if not args.verbose:
        # One line per handler call and per liveness probe drowns the operator's own lines.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    kube = Kube(new_api_client(args.kubeconfig, pool_size=max(4, args.workers * 2)))
    handlers.RECONCILER = Reconciler(kube, workers=args.workers, resync=args.resync_period)
    handlers.NAMESPACED = bool(args.namespace)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    identity = f"{kube.instance}/{os.getpid()}/{secrets.token_hex(4)}"
    if not args.standalone:
        handlers.RECONCILER.standby = standby_check(
            kube, args.peering, args.namespace, identity, priority
        )
        period = seconds(os.environ.get("DSOP_PEERING_REPORT_SECONDS", "60")) or 60.0
        report_peering(kube, args.peering, args.namespace, priority, period)
    liveness = None if args.liveness in ("", "off", "none") else args.liveness
    kopf.run(
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=None if args.standalone else priority,
        identity=identity,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=liveness,
    )
    return 0


def _scopes(namespaces: Sequence[str]) -> list[str | None]:
    """The peering objects' namespaces: None for the ClusterKopfPeering; glob patterns left out."""
    if not namespaces:
        return [None]
    return [n for n in namespaces if not any(c in n for c in "*?[")]


def report_peering(
    kube: Kube, peering: str, namespaces: Sequence[str], priority: int, period: float
) -> threading.Thread:
    """Say at start which peering objects this replica meets its peers in, and, at start and
    every `period` seconds while one is missing, that kopf waits for it (silently, otherwise)."""
    scopes = _scopes(namespaces)
    log.info(
        "leader election: through %s (priority %d); this replica acts while no live peer "
        "outranks it",
        ", ".join(describe_peering(peering, ns) for ns in scopes),
        priority,
    )

    def missing() -> tuple[list[str | None], bool]:
        absent = [ns for ns in scopes if kube.peering_status(peering, ns) is None]
        crd_missing = bool(absent) and kube.get_path("/apis/kopf.dev/v1") is None
        return absent, crd_missing

    def loop() -> None:
        waiting = False
        while True:
            try:
                absent, crd_missing = missing()
            except Exception as exc:  # noqa: BLE001 - a report must never stop the operator
                log.warning("leader election: cannot read the peering objects: %s", exc)
            else:
                if absent:
                    log.warning(peering_wait_message(peering, absent, crd_missing))
                elif waiting:
                    log.info("leader election: the peering objects exist; kopf resumes")
                waiting = bool(absent)
            time.sleep(period)

    thread = threading.Thread(target=loop, name="peering-report", daemon=True)
    thread.start()
    return thread


def standby_check(
    kube: Kube, peering: str, namespaces: Sequence[str], identity: str, priority: int
) -> Callable[[], list[str]]:
    """The live peers that pause this replica now, from every peering object it keeps alive:
    the ClusterKopfPeering, or one KopfPeering per named namespace (glob patterns are left out)."""
    scopes = _scopes(namespaces)

    def check() -> list[str]:
        now = dt.datetime.now(dt.UTC)
        return sorted(
            {
                peer
                for scope in scopes
                for peer in outranking_peers(
                    kube.peering_status(peering, scope), identity, priority, now
                )
            }
        )

    return check


if __name__ == "__main__":
    sys.exit(main())

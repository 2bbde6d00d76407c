"""clusterctl's commands.

Exit codes: 0 done, 1 failed, 2 usage, 3 (status) not up, 4 (compare) snapshots differ.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

from . import build, cluster, images, snapshot
from .layout import Layout
from .processes import StartError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clusterctl",
        description="A one-node Kubernetes cluster on this machine for multisniff's tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the Kubernetes binaries and the images (cached)")
    p_up = sub.add_parser("up", help="start the cluster (idempotent; cleans up leftovers first)")
    p_up.add_argument("--no-workload", action="store_true",
                      help="do not apply tests/cluster/manifests/*.yaml")
    sub.add_parser("down", help="stop the cluster and remove everything it left on the host")
    for verb, what in (("stop", "stop one component (containers go on) and wait until it is "
                                "gone"),
                       ("start", "start a stopped component and wait until it is ready"),
                       ("restart", "stop, then start, one component (fault tests)")):
        sub.add_parser(verb, help=what).add_argument("component",
                                                     choices=cluster.RESTARTABLE)
    p_status = sub.add_parser("status", help="is it up? (exit 0 if so, 3 if not)")
    p_status.add_argument("--json", action="store_true", help="facts for the test fixture")
    sub.add_parser("env", help="print shell exports for KUBECONFIG and kubectl")
    sub.add_parser("demo", help="(re)apply tests/cluster/manifests/*.yaml and wait for the pods")
    p_snap = sub.add_parser("snapshot", help="record the host state a cluster could change")
    p_snap.add_argument("file", type=Path)
    p_cmp = sub.add_parser("compare", help="diff two snapshots (exit 4 if they differ)")
    p_cmp.add_argument("before", type=Path)
    p_cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    layout = Layout.from_environment()

    if args.command in ("build", "up", "down", "demo", "stop", "start", "restart"):
        # One of these at a time: two test sessions starting the cluster at once would fight.
        layout.state.mkdir(parents=True, exist_ok=True)
        lock = open(layout.state / "clusterctl.lock", "w")  # noqa: SIM115 (held until exit)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        return _dispatch(args, layout)
    except (cluster.ClusterError, StartError, build.BuildError, images.ImageError) as exc:
        print(f"clusterctl {args.command}: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, layout: Layout) -> int:
    if args.command == "build":
        started = time.monotonic()
        build.binaries(layout)
        build.images(layout)
        print(f"build: done in {time.monotonic() - started:.0f}s", file=sys.stderr)
        return 0
    if args.command == "up":
        cluster.up(layout, workload=not args.no_workload)
        return 0
    if args.command == "down":
        return 1 if cluster.down(layout) else 0
    if args.command in ("stop", "start", "restart"):
        {"stop": cluster.stop, "start": cluster.start,
         "restart": cluster.restart}[args.command](layout, args.component)
        return 0
    if args.command == "status":
        st = cluster.status(layout)
        facts = cluster.describe(layout, st)
        if args.json:
            print(json.dumps(facts, indent=2))
        else:
            print(f"{facts['state']}: running {', '.join(st.running) or 'nothing'}"
                  + (f"; missing {', '.join(st.missing)}" if st.missing and not st.down else "")
                  + f"; API server {'ready' if st.apiserver_ready else 'not ready'}"
                  + f"; node {'Ready' if st.node_ready else 'not Ready'}")
        return 0 if st.up else 3
    if args.command == "env":
        print(f"export KUBECONFIG={layout.admin_kubeconfig}")
        print(f"export PATH={layout.bin_dir}:$PATH")
        return 0
    if args.command == "demo":
        cluster.apply_workload(layout)
        return 0
    if args.command == "snapshot":
        snapshot.save(layout, args.file)
        return 0
    if args.command == "compare":
        diff = snapshot.compare(json.loads(args.before.read_text()),
                                json.loads(args.after.read_text()))
        if diff:
            print(diff)
            return 4
        print(f"no difference between {args.before} and {args.after}", file=sys.stderr)
        return 0
    raise AssertionError(args.command)

"""`lora-server serve-cluster`: the Ray Serve application on a Ray cluster (a local one if none is given).

    lora-server serve-cluster --adapter-repository /mnt/adapters --num-replicas 2 --num-gpus-per-replica 1 \\
        [every `lora-server serve` flag: --model, --api-keys, --quantize, --host, --port, ...]

Every `serve` flag is passed to each replica as it is; --host/--port are the ingress's. --store is ignored: each
replica keeps its own cache of the repository. See deploy/CLUSTER.md."""

import argparse
import logging
import signal
import threading

logger = logging.getLogger(__name__)

# Ray Serve autoscaling on queue depth: each replica aims at this many requests in flight (ongoing + queued at it).
TARGET_ONGOING_REQUESTS = 32


def cluster_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-server serve-cluster", description=__doc__, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("cluster")
    group.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    group.add_argument("--num-replicas", type=int, default=1, help="engine replicas (fixed; see --max-replicas)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscale between --num-replicas and this on queue depth (target "
                            f"{TARGET_ONGOING_REQUESTS} requests in flight per replica)")
    group.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="1 on GPU machines")
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    return parser


def run_serve_cluster(argv: list[str]) -> int:
    """Deploy and serve until SIGTERM/SIGINT; the exit status."""
    parser = cluster_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    cluster, serve_argv = parser.parse_known_args(argv)
    from lora_server.cluster.app import build_application, parse_serve_argv  # Ray: the optional `cluster` extra

    args = parse_serve_argv(serve_argv)
    if args.adapter_repository is None:
        logger.error("serve-cluster needs --adapter-repository DIR: the replicas' one shared adapter repository")
        return 2
    if cluster.num_replicas < 1 or (cluster.max_replicas is not None and cluster.max_replicas < cluster.num_replicas):
        logger.error("--num-replicas must be >= 1 and --max-replicas >= --num-replicas")
        return 2
    import ray
    from ray import serve

    ray.init(address=cluster.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    autoscaling = None if cluster.max_replicas is None else {
        "min_replicas": cluster.num_replicas, "max_replicas": cluster.max_replicas,
        "target_ongoing_requests": TARGET_ONGOING_REQUESTS}
    serve.run(build_application(serve_argv, cluster.num_replicas, cluster.num_gpus_per_replica,
                                cluster.num_cpus_per_replica, autoscaling), name="lora-server", route_prefix="/")
    logger.info("serving on http://%s:%d", args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0

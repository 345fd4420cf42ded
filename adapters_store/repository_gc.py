"""Remove the blobs of deleted versions from a shared adapter repository: `python -m
lora_server.adapters_store.repository_gc DIR [--grace-seconds S] [--dry-run]`. Safe while servers run and upload
(see AdapterRepository.collect_orphan_blobs); run it from cron or a Kubernetes CronJob, on any one machine."""

import argparse
import logging

from lora_server.adapters_store.repository import COLLECT_GRACE_S, AdapterRepository

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_server.adapters_store.repository_gc", description=__doc__)
    parser.add_argument("repository", help="the adapter repository directory (--adapter-repository of the servers)")
    parser.add_argument("--grace-seconds", type=float, default=COLLECT_GRACE_S,
                        help="keep orphan blobs touched more recently than this (an upload may be about to name them)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    if args.grace_seconds < 0:
        parser.error("--grace-seconds must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repository = AdapterRepository.open(args.repository)
    if args.dry_run:
        orphans = sorted(repository.orphan_blobs(args.grace_seconds))
        logger.info("%d orphan blobs would be removed%s", len(orphans), "".join(f"\n  {sha}" for sha in orphans))
    else:
        removed = repository.collect_orphan_blobs(args.grace_seconds)
        logger.info("%d orphan blobs removed%s", len(removed), "".join(f"\n  {sha}" for sha in removed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fleet-mode flags of ``nlsr realign`` and what they become; `nlsr_hub.cli` only registers them and hands over."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .engines import ENGINES

EXAMPLE = """fleet mode (several adapters, a list, a glob or a Hub listing; one safety patch):
  nlsr realign --safety-patch org/safety-patch --finetuned-list adapters.txt --output fleet/
  nlsr realign --safety-patch patch/ --finetuned-glob 'customers/*/adapter' --output fleet/ --engine ray
  nlsr realign --safety-patch org/safety-patch --finetuned-hub org/customer- --output fleet/ \\
      --push-to-hub 'org/{name}-nlsr' --create-pr
"""


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """The fleet flags of ``nlsr realign`` (the inputs, push and Hub flags are shared with single mode)."""
    parser.epilog = (parser.epilog or "") + "\n" + EXAMPLE
    group = parser.add_argument_group(
        "fleet mode (several adapters: DIR/<name>/ each, or pushed with --push-to-hub 'org/{name}-nlsr'; "
        "DIR/summary.json and summary.md)")
    group.add_argument("--finetuned-glob", action="append", default=[], metavar="PATTERN",
                       help="Local folders matching this glob (quote it), e.g. 'adapters/*'; repeatable.")
    group.add_argument("--finetuned-hub", action="append", default=[], metavar="ORG[/PREFIX]",
                       help="Every adapter repo of a Hub user or organisation, or those whose id starts with "
                       "ORG/PREFIX; repeatable. Repos the push template names are left out.")
    group.add_argument("--engine", choices=ENGINES, default="sequential",
                       help="sequential (default) or ray: one Ray task per adapter, on a local Ray (`ray.init()`) "
                       "or the cluster at --ray-address; needs `pip install 'nlsr-hub[ray]'`.")
    group.add_argument("--ray-address", default=None, help="Address of an existing Ray cluster (with --engine ray); "
                       "its workers need HF_TOKEN of their own, and --output must be a folder every node sees.")
    group.add_argument("--ray-num-cpus", type=float, default=None, metavar="CPUS",
                       help="CPUs Ray reserves per adapter task (with --engine ray; default 1). 2 halves how many "
                       "adapters a node holds in memory at once; a fraction such as 0.5 runs more adapters than cores, "
                       "for fleets whose tasks mostly wait on the Hub.")
    group.add_argument("--force", action="store_true",
                       help="Realign every adapter, even those whose result already matches the input commit or file "
                       "hash, the safety patch and the config (skipped by default, so a re-run resumes).")


def fleet_requested(args: argparse.Namespace) -> bool:
    """Fleet mode: several `--finetuned`, a list file, a glob, a Hub listing, or the Ray engine."""
    return bool(len(args.finetuned) > 1 or args.finetuned_list or args.finetuned_glob or args.finetuned_hub
                or args.engine != "sequential" or args.ray_address or args.ray_num_cpus is not None)


def run_fleet_command(args: argparse.Namespace, make_patcher: Callable[[], Any]) -> int:
    """Gather the adapters, realign them with the patcher `make_patcher()` builds, print the summary table; exit code 1
    when an adapter failed."""
    from ..io import check_readable_file
    from .driver import realign_fleet
    from .inputs import check_push_template, collect_specs
    from .work import FleetSettings

    if args.plan_json is not None:
        raise ValueError("`--plan-json` takes one adapter; in fleet mode every result folder holds its nlsr_plan.json.")
    if args.output is None and not args.dry_run:
        raise ValueError("Fleet mode needs `--output DIR`: it holds summary.json and summary.md (and the results, "
                         "unless `--push-to-hub 'org/{name}-nlsr'` pushes them).")
    if args.calibration is not None:
        check_readable_file(args.calibration, "Calibration file")
    if args.push_to_hub is not None and not args.dry_run:
        check_push_template(args.push_to_hub, [])  # its form, before the listing that leaves its repos out
    specs = collect_specs(args.finetuned, list_files=[args.finetuned_list] if args.finetuned_list else [],
                          globs=args.finetuned_glob, hub_prefixes=args.finetuned_hub, token=args.token,
                          exclude_template=args.push_to_hub)
    settings = FleetSettings(
        output_dir=args.output, push_to=args.push_to_hub, create_pr=args.create_pr, private=args.private,
        commit_message=args.commit_message or "Upload NLSR-realigned adapter", allow_pickle=args.allow_pickle,
        hub_kwargs={"revision": args.revision, "cache_dir": args.cache_dir, "local_files_only": args.local_files_only},
        strict_base=args.strict_base, dry_run=args.dry_run, resume=not args.force,
    )
    report = realign_fleet(make_patcher(), specs, settings=settings, engine=args.engine, ray_address=args.ray_address,
                           ray_num_cpus=args.ray_num_cpus, calibration=args.calibration, token=args.token)
    print(report.table())
    if args.output is not None and not args.dry_run:
        print(f"summary written to {args.output / 'summary.json'} and {args.output / 'summary.md'}")
    return 1 if report.failed else 0

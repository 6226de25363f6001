"""``nlsr webhook``: its flags and what they become (`WebhookSettings`); `nlsr_hub.cli` only registers it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from .settings import DESTINATIONS, SECRET_ENV, WebhookSettings

EXAMPLE = f"""example:
  export {SECRET_ENV}=...   # the same value as in the Hub webhook's settings
  nlsr webhook --safety-patch org/safety-patch --watch 'org/*-lora' --host 0.0.0.0 --port 7860
  # Hub webhook: target URL http://HOST:7860/webhooks/realign, secret ${SECRET_ENV}, events "Repo update"
"""


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``nlsr webhook`` (the NLSR config flags are added by the CLI, as for ``nlsr realign``)."""
    parser.epilog = EXAMPLE
    group = parser.add_argument_group("webhook")
    group.add_argument("--safety-patch", required=True, help="The organisation's safety patch: org/name[@revision]"
                       "[:subfolder] or a folder written by `nlsr patch`.")
    group.add_argument("--secret", default=None, help=f"The webhook secret (default ${SECRET_ENV}; prefer the "
                       "variable: a flag is visible in the process list).")
    group.add_argument("--watch", nargs="+", required=True, metavar="REPO_OR_PATTERN",
                       help="Adapter repos to realign: ids or shell patterns such as 'org/*-lora' ('*': every repo "
                       "the Hub webhook reports).")
    group.add_argument("--branch", default="main", help="Branch whose new commits are realigned (default: main).")
    group.add_argument("--to", dest="destination", choices=DESTINATIONS, default="pr",
                       help="pr: a pull request on the same repo, adapter under --subfolder (default); repo: a commit "
                       "to the repo named by --repo-template.")
    group.add_argument("--subfolder", default="nlsr-realigned", help="Folder of the realigned adapter in the pull "
                       "request (default: nlsr-realigned).")
    group.add_argument("--repo-template", default="{repo}-nlsr", help="Target repo for --to repo, from {repo}, "
                       "{namespace} and {name} (default: {repo}-nlsr).")
    group.add_argument("--token", default=None, help="Hub token with write access to the watched repos (default: "
                       "the logged-in token; never printed or stored).")
    group.add_argument("--cache-dir", default=None, help="Hub cache folder.")
    group.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    group.add_argument("--port", type=int, default=7860, help="Port to serve on (default: 7860).")
    group.add_argument("--max-queue", type=int, default=8, help="Events waiting at most; more get 503 (default: 8).")
    group.add_argument("--history", type=int, default=100, help="Recent jobs the status endpoint lists.")


def webhook_settings_from_args(args: argparse.Namespace, config: Any) -> WebhookSettings:
    """`WebhookSettings` from the parsed flags, the secret from `--secret` or ``$WEBHOOK_SECRET``."""
    return WebhookSettings(
        safety_patch=args.safety_patch, secret=args.secret or os.environ.get(SECRET_ENV, ""), watch=tuple(args.watch),
        branch=args.branch, destination=args.destination, subfolder=args.subfolder,
        repo_template=args.repo_template, config=config, token=args.token, cache_dir=args.cache_dir,
        max_queue=args.max_queue, history=args.history,
    )


def run_webhook(args: argparse.Namespace, config: Any) -> int:
    """Serve until interrupted; every decision is logged at INFO level (never the secret or the token)."""
    from . import serve

    settings = webhook_settings_from_args(args, config)
    logging.getLogger("nlsr_hub.webhook").setLevel(logging.INFO)
    print(f"nlsr webhook: checking the safety patch, then serving http://{args.host}:{args.port}/webhooks/realign "
          f"(watching {', '.join(settings.watch)}; results as {settings.destination})")
    with stop_on_sigterm():
        serve(settings, server_name=args.host, server_port=args.port, block=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM stops the server as Ctrl-C does: it stops serving, waits for the running job (up
    to 30 s) and exits 0. A container's stop (`docker stop`, a Space restarting, systemd) sends SIGTERM, and a
    process started in the background (`nohup … &`) ignores Ctrl-C's SIGINT; a Python process that is a container's
    PID 1 would otherwise ignore SIGTERM too, until it is killed mid-job. Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

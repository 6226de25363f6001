"""Auto-realign on push: a Hub webhook that realigns every new commit of a watched adapter repo with the
organisation's safety patch and opens a pull request with the realigned adapter and its card (or commits it to
another repo). ``nlsr webhook`` on the command line; `serve` or `RealignWebhook` from Python.

Needs gradio and fastapi (huggingface_hub's `WebhooksServer`): ``pip install 'nlsr-hub[webhook]'``. Importing this
package does not import them.

- `settings`: `WebhookSettings` (secret, safety patch, watched repos, destination, NLSR config, queue size).
- `events`: pure triage of one payload, and the markers the server writes into its titles.
- `jobs`: the bounded queue, the one worker thread, the recent jobs.
- `actions`: everything one job does on the Hub.
- `server`: `RealignWebhook`, the endpoints on huggingface_hub's `WebhooksServer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import DESTINATIONS, SECRET_ENV, WebhookSettings

if TYPE_CHECKING:
    from .server import RealignWebhook

__all__ = ["DESTINATIONS", "SECRET_ENV", "RealignWebhook", "WebhookSettings", "serve"]


def __getattr__(name: str) -> Any:
    if name == "RealignWebhook":
        from .server import RealignWebhook

        return RealignWebhook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(settings: WebhookSettings, *, server_name: str = "127.0.0.1", server_port: int = 7860,
          block: bool = True) -> RealignWebhook:
    """Serve the realignment webhook with `settings` (blocking unless `block=False`); returns the server, whose
    `url` is set and whose `close()` stops it."""
    from .server import RealignWebhook

    webhook = RealignWebhook(settings)
    webhook.launch(server_name=server_name, server_port=server_port, block=block)
    return webhook

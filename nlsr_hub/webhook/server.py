"""`RealignWebhook`: huggingface_hub's `WebhooksServer` with one endpoint that realigns watched adapter repos.

``POST /webhooks/realign`` takes the Hub's webhook events: the secret is checked first (constant time; wrong or
missing → 401 and nothing else happens), the payload is read with huggingface_hub's `WebhookPayload`, and a new
commit on the watched branch of a watched repo is queued (202); anything else is answered 200 ``ignored`` with
the reason, and logged. ``GET /webhooks/status`` (same secret) lists the recent jobs.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)
"""

import hmac
import logging
import queue
import warnings
from typing import Any

from .actions import check_safety_patch, run_job
from .events import triage
from .jobs import IGNORED, Job, JobQueue
from .settings import WebhookSettings

logger = logging.getLogger(__name__)

ENDPOINT = "/webhooks/realign"
STATUS = "/webhooks/status"
SECRET_HEADER = "X-Webhook-Secret"


def secret_matches(given: str | None, secret: str) -> bool:
    """Whether the request's secret header equals `secret` (constant-time comparison)."""
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


class RealignWebhook:
    """The realignment webhook server. `launch()` serves it (``nlsr webhook``); `close()` stops it.

    Example::

        from nlsr_hub.webhook import RealignWebhook, WebhookSettings

        settings = WebhookSettings(safety_patch="org/safety-patch", secret=os.environ["WEBHOOK_SECRET"],
                                   watch=("org/*-lora",))
        RealignWebhook(settings).launch(server_name="0.0.0.0", server_port=7860)  # blocks
    """

    def __init__(self, settings: WebhookSettings, *, api: Any | None = None) -> None:
        if not isinstance(settings, WebhookSettings):
            raise TypeError(f"`settings` must be a WebhookSettings (got {type(settings).__name__}).")
        self.settings = settings
        self._api = api
        self.jobs = JobQueue(self._run, max_queue=settings.max_queue, history=settings.history)
        self._ui: Any | None = None
        self.url: str | None = None

    @property
    def api(self) -> Any:
        """The `HfApi` every job uses (built on first use, with the settings' token)."""
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(token=self.settings.token)
        return self._api

    def _run(self, job: Job) -> tuple[str, str, str | None]:
        outcome = run_job(self.api, self.settings, job.repo_id, job.sha or "", job.private)
        return outcome.state, outcome.detail, outcome.url

    def handle(self, secret: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        """Answer one delivery: ``(HTTP status, JSON body)``. Nothing happens unless `secret` matches."""
        if not secret_matches(secret, self.settings.secret):
            logger.warning("rejected a webhook call with a wrong or missing %s header", SECRET_HEADER)
            return 401, {"error": f"wrong or missing {SECRET_HEADER}"}
        from huggingface_hub import WebhookPayload
        from pydantic import ValidationError

        try:
            payload = WebhookPayload.model_validate(body)
        except ValidationError as err:
            logger.info("ignored a payload that is not a Hub webhook event (%d errors)", err.error_count())
            return 422, {"error": "not a Hugging Face Hub webhook payload (version 3)"}
        decision = triage(payload, self.settings)
        if not decision.wanted:
            logger.info("ignored event for %s: %s", decision.repo_id, decision.reason)
            job = self.jobs.record(decision.repo_id, None, IGNORED, decision.reason or "")
            return 200, {"status": "ignored", "reason": decision.reason, "job": job.id}
        try:
            job, new = self.jobs.submit(decision.repo_id, decision.sha or "", private=decision.private)
        except queue.Full:
            logger.warning("queue full: dropped the event for %s@%s", decision.repo_id, (decision.sha or "")[:12])
            return 503, {"error": "queue full, try again later"}
        if not new:
            logger.info("ignored event for %s: commit %s already seen (job %d, %s)", decision.repo_id,
                        (decision.sha or "")[:12], job.id, job.state)
            return 200, {"status": "duplicate", "job": job.id, "state": job.state}
        logger.info("queued job %d: %s@%s", job.id, job.repo_id, (job.sha or "")[:12])
        return 202, {"status": "queued", "job": job.id}

    def status(self, secret: str | None) -> tuple[int, dict[str, Any]]:
        """The status endpoint's answer: the recent jobs, newest first (needs the secret too)."""
        if not secret_matches(secret, self.settings.secret):
            return 401, {"error": f"wrong or missing {SECRET_HEADER}"}
        jobs = self.jobs.snapshot()
        return 200, {"jobs": jobs, "queued": sum(j["state"] == "queued" for j in jobs)}

    def launch(self, *, server_name: str = "127.0.0.1", server_port: int = 7860, block: bool = True) -> str:
        """Check the safety patch, start the worker and serve (blocking unless `block=False`); returns the URL."""
        from fastapi import Request
        from fastapi.responses import JSONResponse

        async def realign(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError:
                body = None
            status, answer = self.handle(request.headers.get(SECRET_HEADER), body)
            return JSONResponse(answer, status_code=status)

        async def status(request: Request) -> JSONResponse:
            code, answer = self.status(request.headers.get(SECRET_HEADER))
            return JSONResponse(answer, status_code=code)

        check_safety_patch(self.settings)
        server = self._webhooks_server()
        server.add_webhook(ENDPOINT.removeprefix("/webhooks/"))(realign)
        self.jobs.start()
        server.launch(prevent_thread_lock=True, share=False, server_name=server_name, server_port=server_port,
                      quiet=True)
        server.fastapi_app.get(STATUS)(status)
        self.url = self._ui.local_url.rstrip("/")
        if block:
            try:
                self._ui.block_thread()
            finally:
                self.close()
        return self.url

    def _webhooks_server(self) -> Any:
        """huggingface_hub's `WebhooksServer` on a small landing page; the endpoint checks the secret itself (401
        for a wrong secret too, where the library's own check would answer 403), so the server gets none."""
        import gradio as gr
        from huggingface_hub import WebhooksServer

        with gr.Blocks(analytics_enabled=False, title="nlsr webhook") as self._ui:
            gr.Markdown(f"# nlsr webhook\n\nPOST Hub webhook events to `{ENDPOINT}` (with the secret); "
                        f"`GET {STATUS}` with the `{SECRET_HEADER}` header lists the recent jobs.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental.*")
            server = WebhooksServer(ui=self._ui, webhook_secret=self.settings.secret)
        server.webhook_secret = None  # checked in `handle`, constant time, 401 for wrong or missing
        return server

    def close(self) -> None:
        """Stop serving and stop the worker (the running job finishes first)."""
        if self._ui is not None:
            self._ui.close()
            self._ui = None
        self.jobs.stop()

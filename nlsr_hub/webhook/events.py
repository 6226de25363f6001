"""Pure decisions about Hub webhook events: which are new commits to realign, and the markers the server leaves.

No network and no state here: `triage` reads one payload (huggingface_hub's `WebhookPayload` model) and the
settings; the markers below are what the server writes into pull request titles, so that a later event (a
redelivery, a restart, the merge of its own pull request) can be recognised on the Hub itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import WebhookSettings

MARKER = "[nlsr-webhook]"
FAILURE_TITLE = f"{MARKER} Automatic safety realignment failed"
_MAX_ERROR = 500


@dataclass(frozen=True)
class Triage:
    """What to do with one event: realign `repo_id` at `sha` (reached through `ref`), or ignore it for `reason`."""

    repo_id: str
    reason: str | None = None
    sha: str | None = None
    ref: str | None = None
    private: bool = False

    @property
    def wanted(self) -> bool:
        return self.reason is None


def triage(payload: Any, settings: WebhookSettings) -> Triage:
    """Decide on a validated `WebhookPayload`: a new commit on the watched branch of a watched model repo is
    realigned; everything else (discussions and comments, including the server's own, repo settings, deletions,
    pull request refs, datasets and Spaces, repos not watched) is ignored with the reason."""
    repo = payload.repo
    scope, action = payload.event.scope, payload.event.action
    if repo.type != "model":
        return Triage(repo.name, f"a {repo.type} repo, not a model repo")
    if scope != "repo.content" or action != "update":
        return Triage(repo.name, f"event {scope}/{action} is not a new commit")
    if not settings.watches(repo.name):
        return Triage(repo.name, "not a watched repo")
    wanted_ref = f"refs/heads/{settings.branch}"
    for updated in payload.updatedRefs or ():
        if updated.ref == wanted_ref:
            if not updated.newSha or set(updated.newSha) == {"0"}:
                return Triage(repo.name, f"{wanted_ref} was deleted")
            return Triage(repo.name, sha=updated.newSha, ref=updated.ref, private=repo.private)
    refs = ", ".join(u.ref for u in payload.updatedRefs or ()) or "none"
    return Triage(repo.name, f"no new commit on {wanted_ref} (updated refs: {refs})")


def pr_title(sha: str, weights: str) -> str:
    """The title of the server's pull request (or commit) for commit `sha` whose adapter weights hash to
    `weights`; both are looked for by `is_realigned`."""
    return f"{MARKER} Safety-realigned adapter for {sha[:12]} (weights {weights[:12]})"


def is_realigned(title: str, sha: str, weights: str) -> bool:
    """Whether a title written by `pr_title` covers this commit or these exact adapter weights: the merge of the
    server's own pull request leaves the adapter unchanged, so it is recognised by its weights."""
    return title.startswith(MARKER) and (sha[:12] in title or f"weights {weights[:12]}" in title)


def one_line_error(err: BaseException, *, secrets: tuple[str | None, ...] = ()) -> str:
    """`err` as one line of at most 500 characters, with every secret in `secrets` blanked out."""
    text = " ".join(str(err).split()) or type(err).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR - 1] + "…"


def failure_comment(sha: str, error: str) -> str:
    """The discussion comment that reports a failed realignment of commit `sha`."""
    return f"Realigning commit `{sha[:12]}` failed: {error}"

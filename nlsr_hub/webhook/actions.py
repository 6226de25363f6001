"""What one webhook job does on the Hub: inspect the commit, skip what was already realigned, realign with the
safety patch, publish (pull request or repo), or report the one-line error in a discussion.

Every Hub call of the webhook is here, through huggingface_hub's `HfApi` and nlsr-hub's own `hub` module; the
token is passed to the client and never logged or written.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import FAILURE_TITLE, failure_comment, is_realigned, one_line_error, pr_title
from .settings import WebhookSettings

logger = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS, PLAN_FILE = "adapter_config.json", "adapter_model.safetensors", "nlsr_plan.json"


@dataclass(frozen=True)
class Outcome:
    """How a job ended: ``done`` (`url` is the pull request or commit), ``ignored`` or ``failed`` (`detail` is the
    reason or the one-line error; `url` the discussion that reports it, if posting worked)."""

    state: str
    detail: str
    url: str | None = None


@dataclass(frozen=True)
class AdapterAt:
    """The adapter files of a commit: their content ids, and whether the folder is itself an nlsr result."""

    weights: str  # sha256 of the config's and the weights' content ids: the same adapter gives the same value
    realigned: bool


def check_safety_patch(settings: WebhookSettings) -> None:
    """Download and read the safety patch once, so that a wrong id, revision or token fails at start-up (a
    `ValueError` naming the problem), not on the first event."""
    from ..hub import PATCH_FILES, resolve
    from ..safety_patch import SafetyPatch

    resolved = resolve(settings.safety_patch, files=PATCH_FILES, token=settings.token, cache_dir=settings.cache_dir)
    SafetyPatch.from_pretrained(resolved.local_path)


def inspect_adapter(api: Any, repo_id: str, sha: str) -> AdapterAt | None:
    """The adapter at `repo_id`@`sha` (one paths-info request), or None when the commit holds no adapter config."""
    found = {f.path: f for f in api.get_paths_info(repo_id, [ADAPTER_CONFIG, ADAPTER_WEIGHTS, PLAN_FILE],
                                                   revision=sha)}
    if ADAPTER_CONFIG not in found:
        return None
    weights = found.get(ADAPTER_WEIGHTS)
    weights_id = "" if weights is None else (weights.lfs.sha256 if weights.lfs else weights.blob_id)
    digest = hashlib.sha256(f"{found[ADAPTER_CONFIG].blob_id}:{weights_id}".encode()).hexdigest()
    return AdapterAt(weights=digest, realigned=PLAN_FILE in found)


def existing_realignment(api: Any, settings: WebhookSettings, repo_id: str, sha: str, weights: str) -> str | None:
    """The URL of the server's earlier pull request (any status) or commit for this commit or these adapter weights,
    looked up on the Hub so that it holds across restarts; None if there is none."""
    from huggingface_hub.errors import RepositoryNotFoundError

    if settings.destination == "pr":
        for discussion in api.get_repo_discussions(repo_id, discussion_type="pull_request"):
            if is_realigned(discussion.title, sha, weights):
                return discussion.url
        return None
    target = settings.target_repo(repo_id)
    try:
        commits = api.list_repo_commits(target)
    except RepositoryNotFoundError:
        return None
    return next((f"{api.endpoint}/{target}/commit/{c.commit_id}" for c in commits
                 if is_realigned(c.title, sha, weights)), None)


def _description(settings: WebhookSettings, repo_id: str, sha: str, plan: Any, where: str) -> str:
    return (f"Automatic safety realignment of `{repo_id}` at commit `{sha}` with the safety patch "
            f"`{settings.safety_patch}` (restorer `{plan.restorer}`, {plan.num_patched}/{len(plan.modules)} modules "
            f"changed; every decision is in `nlsr_plan.json`).\n\n{where}\n\nOpened by `nlsr webhook`.")


def _write_into_subfolder(result: Any, folder: Path, repo_id: str, subfolder: str) -> None:
    """Save `result` under `folder`/`subfolder`; the card's loading snippet then names the subfolder."""
    result.save_pretrained(folder / subfolder, repo_id=repo_id)
    card = folder / subfolder / "README.md"
    snippet = f"PeftModel.from_pretrained(base, {repo_id!r})"
    text = card.read_text(encoding="utf-8")
    card.write_text(text.replace(snippet, f"PeftModel.from_pretrained(base, {repo_id!r}, subfolder={subfolder!r})"),
                    encoding="utf-8")


def realign_and_publish(settings: WebhookSettings, repo_id: str, sha: str, weights: str, private: bool) -> str:
    """Realign `repo_id`@`sha` with the safety patch and publish it; returns the pull request or commit URL."""
    from ..hub import push_folder_with
    from ..patcher import NLSRPatcher

    patcher = NLSRPatcher.from_pretrained(None, finetuned=f"{repo_id}@{sha}", safety_patch=settings.safety_patch,
                                          config=settings.config, token=settings.token, cache_dir=settings.cache_dir)
    result = patcher.realign(progress=False)
    title = pr_title(sha, weights)
    if settings.destination == "pr":
        where = (f"The realigned adapter and its model card are in `{settings.subfolder}/`; the adapter at the repo "
                 "root is unchanged. Review and merge.")
        info = push_folder_with(
            lambda folder: _write_into_subfolder(result, folder, repo_id, settings.subfolder), repo_id,
            token=settings.token, create_pr=True, commit_message=title,
            commit_description=_description(settings, repo_id, sha, result.plan, where))
        return info.pr_url
    target = settings.target_repo(repo_id)
    info = result.push_to_hub(target, private=private, token=settings.token, commit_message=title)
    return info.commit_url


def report_failure(api: Any, repo_id: str, sha: str, error: str) -> str:
    """Comment `error` on the repo's open failure discussion (opened on first use); returns its URL. A commit whose
    failure is already reported there is not reported twice."""
    discussion = next((d for d in api.get_repo_discussions(repo_id, discussion_type="discussion",
                                                            discussion_status="open") if d.title == FAILURE_TITLE),
                      None)
    if discussion is None:
        discussion = api.create_discussion(
            repo_id, FAILURE_TITLE, description="`nlsr webhook` reports here the commits it could not realign, "
            "one comment each. Fix the adapter and push again; a new commit is realigned as usual.")
    details = api.get_discussion_details(repo_id, discussion.num)
    if not any(sha[:12] in getattr(event, "content", "") for event in details.events):
        api.comment_discussion(repo_id, discussion.num, failure_comment(sha, error))
    return discussion.url


def run_job(api: Any, settings: WebhookSettings, repo_id: str, sha: str, private: bool = False) -> Outcome:
    """One job, start to end; never raises (a failure becomes a discussion comment and a ``failed`` outcome)."""
    try:
        adapter = inspect_adapter(api, repo_id, sha)
        if adapter is None:
            return Outcome("ignored", f"not an adapter repo: no {ADAPTER_CONFIG} at {sha[:12]}")
        if adapter.realigned:
            return Outcome("ignored", f"the adapter at {sha[:12]} is an nlsr result ({PLAN_FILE}): not realigned again")
        earlier = existing_realignment(api, settings, repo_id, sha, adapter.weights)
        if earlier is not None:
            return Outcome("ignored", "already realigned (same commit or same adapter weights)", earlier)
        return Outcome("done", "realigned", realign_and_publish(settings, repo_id, sha, adapter.weights, private))
    except Exception as err:  # any failure is reported, never raised into the worker
        error = one_line_error(err, secrets=(settings.token, settings.secret))
    try:
        return Outcome("failed", error, report_failure(api, repo_id, sha, error))
    except Exception as err:
        logger.error("could not report the failure on %s: %s", repo_id,
                     one_line_error(err, secrets=(settings.token, settings.secret)))
        return Outcome("failed", error)

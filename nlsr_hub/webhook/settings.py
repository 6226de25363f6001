"""`WebhookSettings`: what the realignment webhook watches, where its results go, and how it realigns."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..config import NLSRConfig

DESTINATIONS = ("pr", "repo")
SECRET_ENV = "WEBHOOK_SECRET"  # huggingface_hub's WebhooksServer reads the same variable


def _default_config() -> NLSRConfig:
    return NLSRConfig.preset("default")


@dataclass(frozen=True)
class WebhookSettings:
    """Settings of `RealignWebhook` (``nlsr webhook``). The secret and the token never appear in its repr.

    Args:
        safety_patch: the organisation's safety patch, ``org/name[@revision][:subfolder]`` or a local folder.
        secret: the webhook secret the Hub sends in ``X-Webhook-Secret``; required.
        watch: repo ids or shell patterns (``org/*-lora``) of the adapter repos to realign; ``*`` watches every
            repo the Hub webhook reports.
        branch: the branch whose new commits are realigned (other refs, pull requests included, are ignored).
        destination: ``pr`` (a pull request on the same repo, the adapter under `subfolder`) or ``repo`` (a commit
            to the repo named by `repo_template`).
        subfolder: where the realigned adapter and its card go in the pull request.
        repo_template: the target repo of ``destination="repo"``; ``{repo}``, ``{namespace}`` and ``{name}`` are
            the source repo's id and its two parts.
        config: the `NLSRConfig` of every realignment (default: the project's default preset).
        token: the Hub token (default: the logged-in one); it needs write access to the watched repos.
        cache_dir: the Hub cache for downloads.
        max_queue: jobs waiting at most; an event arriving when the queue is full gets 503 and nothing is done.
        history: how many recent jobs the status endpoint lists.
    """

    safety_patch: str
    secret: str = field(repr=False)
    watch: tuple[str, ...] = ("*",)
    branch: str = "main"
    destination: str = "pr"
    subfolder: str = "nlsr-realigned"
    repo_template: str = "{repo}-nlsr"
    config: NLSRConfig = field(default_factory=_default_config)
    token: str | None = field(default=None, repr=False)
    cache_dir: str | None = None
    max_queue: int = 8
    history: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "watch", tuple(self.watch))
        if not isinstance(self.secret, str) or not self.secret.strip():
            raise ValueError(f"`secret` is required: pass `--secret` or set ${SECRET_ENV}, and enter the same value "
                             "in the Hub webhook's settings.")
        if not self.safety_patch or not str(self.safety_patch).strip():
            raise ValueError("`safety_patch` is required: a Hub id (org/safety-patch) or a folder from `nlsr patch`.")
        if not self.watch or not all(isinstance(p, str) and p.strip() for p in self.watch):
            raise ValueError("`watch` needs at least one repo id or pattern, e.g. 'org/*-lora' (or '*').")
        if self.destination not in DESTINATIONS:
            raise ValueError(f"`destination` must be one of {', '.join(DESTINATIONS)} (got {self.destination!r}).")
        parts = self.subfolder.split("/")
        if not self.subfolder or self.subfolder.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"`subfolder` must be a relative folder inside the repo, e.g. 'nlsr-realigned' "
                             f"(got {self.subfolder!r}).")
        self.target_repo("org/example")  # a bad template fails now, not on the first event
        if not isinstance(self.config, NLSRConfig):
            raise TypeError(f"`config` must be an NLSRConfig (got {type(self.config).__name__}).")
        for name in ("max_queue", "history"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer (got {value!r}).")

    def watches(self, repo_id: str) -> bool:
        """Whether `repo_id` is one of the watched repos (exact id or shell pattern, case-sensitive)."""
        return any(fnmatch.fnmatchcase(repo_id, pattern) for pattern in self.watch)

    def target_repo(self, repo_id: str) -> str:
        """The repo that ``destination="repo"`` writes the realignment of `repo_id` to; never `repo_id` itself."""
        namespace, _, name = repo_id.partition("/")
        try:
            target = self.repo_template.format(repo=repo_id, namespace=namespace, name=name)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"`repo_template` {self.repo_template!r} may only use {{repo}}, {{namespace}} and "
                             "{name}, e.g. '{repo}-nlsr'.") from None
        if target.count("/") != 1 or not all(target.split("/")) or target == repo_id:
            raise ValueError(f"`repo_template` {self.repo_template!r} must give another 'namespace/name' repo "
                             f"(got {target!r} for {repo_id!r}), e.g. '{{repo}}-nlsr'.")
        return target

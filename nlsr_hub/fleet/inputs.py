"""Which adapters a fleet realigns, and where each result goes: references given one by one, list files, local globs
and Hub listings, gathered in order (each once); one folder name per adapter; the push target from a template."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..io import read_text_file
from ..refs import InputRef

NAME_FIELD = "{name}"


def output_name(spec: str) -> str:
    """A folder name for a fine-tuned adapter: the repo or folder name, with revision and subfolder."""
    ref = InputRef.parse(spec)
    if ref.path is not None:
        name = ref.path.resolve().name
    else:
        assert ref.repo_id is not None
        name = "-".join(p for p in (ref.repo_id.split("/")[-1], ref.revision, ref.subfolder) if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "adapter"


def read_list_file(path: str | Path) -> list[str]:
    """Adapter references from a text file: one per line; blank lines and ``#`` comments are skipped."""
    lines = read_text_file(path, "`--finetuned-list` file").splitlines()
    specs = [line.split("#", 1)[0].strip() for line in lines]
    return [s for s in specs if s]


def glob_specs(pattern: str) -> list[str]:
    """The folders that the local glob `pattern` matches (``adapters/*``, ``runs/**/adapter``), sorted. A `ValueError`
    when none does: an empty fleet is a typo, not a success."""
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_dir())
    if not matches:
        raise ValueError(f"`--finetuned-glob` {pattern!r} matches no folder; check the pattern, and quote it so that "
                         "the shell does not expand it.")
    return matches


def push_target(template: str, name: str) -> str:
    """The Hub repo an adapter's result is pushed to: `template` with ``{name}`` replaced by the adapter's name."""
    return template.replace(NAME_FIELD, name)


def check_push_template(template: str, names: Sequence[str]) -> None:
    """A `ValueError` unless `template` names one valid repo per adapter (it must contain ``{name}``)."""
    from ..preflight import check_repo_id

    if template.count(NAME_FIELD) != 1 or "{" in template.replace(NAME_FIELD, ""):
        raise ValueError(f"`--push-to-hub` {template!r} must name one repo per adapter with one '{NAME_FIELD}', "
                         "e.g. 'my-org/{name}-nlsr'.")
    for name in names:
        check_repo_id(push_target(template, name), "--push-to-hub")


def _template_regex(template: str) -> re.Pattern[str]:
    before, after = template.split(NAME_FIELD)
    return re.compile(f"^{re.escape(before)}[^/]+{re.escape(after)}$")


def hub_specs(prefix: str, *, token: str | bool | None = None, exclude_template: str | None = None) -> list[str]:
    """The adapter repos of a Hub listing (``org`` or ``org/name-prefix``, see `hub.list_adapter_repos`), without the
    repos that `exclude_template` would push to: a fleet never realigns its own earlier results."""
    from ..hub import list_adapter_repos

    found = list_adapter_repos(prefix, token=token)
    if exclude_template is not None and exclude_template.count(NAME_FIELD) == 1:
        pattern = _template_regex(exclude_template)
        found = [repo for repo in found if not pattern.match(repo)]
    if not found:
        raise ValueError(f"The Hub listing {prefix!r} holds no adapter repo (none with adapter_config.json at its "
                         "root); check the organisation or prefix, and pass `--token` for private repos.")
    return found


def collect_specs(
    finetuned: Sequence[str] = (),
    *,
    list_files: Sequence[str | Path] = (),
    globs: Sequence[str] = (),
    hub_prefixes: Sequence[str] = (),
    token: str | bool | None = None,
    exclude_template: str | None = None,
) -> list[str]:
    """Every adapter reference of a fleet, in the order given (references, list files, globs, Hub listings), each
    once. A `ValueError` when there is none."""
    specs = list(finetuned)
    for path in list_files:
        specs += read_list_file(path)
    for pattern in globs:
        specs += glob_specs(pattern)
    for prefix in hub_prefixes:
        specs += hub_specs(prefix, token=token, exclude_template=exclude_template)
    specs = list(dict.fromkeys(s.strip() for s in specs if s.strip()))
    if not specs:
        raise ValueError("The fleet is empty: pass `--finetuned`, `--finetuned-list FILE`, `--finetuned-glob PATTERN` "
                         "or `--finetuned-hub ORG[/PREFIX]`.")
    return specs


def fleet_name(spec: str) -> str:
    """The result folder name of `spec` (`output_name`); a reference that does not parse, such as a folder that
    no longer exists, still gets a name, so that its error has a row of its own."""
    try:
        return output_name(spec)
    except ValueError:
        last = spec.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "adapter"


def assign_names(specs: Sequence[str]) -> list[str]:
    """One result name per adapter; a `ValueError` lists the adapters that would share one."""
    names = [fleet_name(spec) for spec in specs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        detail = "; ".join(f"{n}: {', '.join(s for s, m in zip(specs, names, strict=True) if m == n)}" for n in clashes)
        raise ValueError(f"Several adapters would get the same result name ({detail}); realign them in separate "
                         "fleets or rename the folders.")
    return names

"""Hub revisions (branches, tags, commits) in the local Hugging Face cache.

Private: :meth:`mechdelta.ModelPair.load` and
:meth:`mechdelta.circuits.series.CheckpointSeries.from_revisions` use it to check, before anything
slow is loaded, that a revision is cached when the hub is offline, and to say exactly what *is*
cached when it is not.

The cache is the standard one (``huggingface_hub.constants.HF_HUB_CACHE``, i.e. ``$HF_HUB_CACHE``
or ``$HF_HOME/hub``), laid out as ``models--ORG--NAME/refs/<revision>`` (a file holding a 40-hex
commit) and ``models--ORG--NAME/snapshots/<commit>/`` (the files of that commit). The location is
read at call time from ``huggingface_hub.constants``, which huggingface_hub fills from the
environment once, when it is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mechdelta.errors import ConfigError, MissingRevisionError

__all__ = [
    "CachedRepo",
    "cached_repo",
    "cached_snapshot",
    "check_revision",
    "label",
    "resolved_commit",
]


def label(name: str, revision: str | None) -> str:
    """The display name of a checkpoint: ``name`` or ``name@revision``."""
    return name if revision is None else f"{name}@{revision}"


def check_revision(revision: str | None) -> str | None:
    """Validate a ``revision`` argument (``None``: the default branch, ``main``)."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not revision.strip() or revision != revision.strip():
        raise ConfigError(
            f"revision must be a non-empty branch, tag or commit hash without surrounding spaces "
            f"(e.g. 'main', 'step1000', a 40-hex commit), got {revision!r}"
        )
    return revision


@dataclass(frozen=True)
class CachedRepo:
    """What the local cache holds of one hub repository.

    ``refs``: revision name -> commit it points to (e.g. ``{"main": "ab12...", "step1000": ...}``);
    ``snapshots``: the commits with a snapshot folder, sorted.
    """

    repo: str
    folder: Path
    refs: dict[str, str]
    snapshots: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.repo:
            raise ConfigError("CachedRepo needs a repository name")

    @property
    def empty(self) -> bool:
        return not self.refs and not self.snapshots

    def describe(self) -> str:
        """``refs main -> <commit>, step1 -> <commit>; snapshots <commit>, <commit>``."""
        refs = ", ".join(f"{r} -> {c}" for r, c in sorted(self.refs.items())) or "none"
        snaps = ", ".join(self.snapshots) or "none"
        return f"refs {refs}; snapshots {snaps}"


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_repo(repo: str) -> CachedRepo:
    """List the refs and snapshots the local cache holds of model repository ``repo``."""
    folder = _cache_dir() / ("models--" + repo.replace("/", "--"))
    refs: dict[str, str] = {}
    refs_dir = folder / "refs"
    if refs_dir.is_dir():
        for path in sorted(refs_dir.rglob("*")):  # refs/pr/1 is a nested ref
            if path.is_file():
                refs[path.relative_to(refs_dir).as_posix()] = path.read_text().strip()
    snap_dir = folder / "snapshots"
    snaps = (
        tuple(sorted(p.name for p in snap_dir.iterdir() if p.is_dir())) if snap_dir.is_dir() else ()
    )
    return CachedRepo(repo=repo, folder=folder, refs=refs, snapshots=snaps)


def resolved_commit(repo: str, revision: str | None) -> str | None:
    """The commit ``revision`` of ``repo`` is cached as (``None`` when it is not cached)."""
    rev = "main" if revision is None else revision
    cached = cached_repo(repo)
    commit = cached.refs.get(rev, rev)
    return commit if commit in cached.snapshots else None


def cached_snapshot(
    repo: str, revision: str | None, *, name: str, offline_flag: str
) -> Path | None:
    """The snapshot folder holding ``config.json`` of ``repo`` at ``revision``.

    ``None`` when nothing of ``repo`` is cached at all (the caller says so); when the repository
    is cached but not this revision, :class:`~mechdelta.errors.MissingRevisionError` naming the
    refs and snapshots that are cached.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(found, str):
        return Path(found).parent
    cached = cached_repo(repo)
    if cached.empty:
        return None
    rev = "main" if revision is None else revision
    default = " (the default branch: no revision= was given)" if revision is None else ""
    commit = cached.refs.get(rev)
    why = (
        f"refs/{rev} points to {commit}, whose snapshot has no config.json"
        if commit is not None
        else f"no ref {rev!r} and no snapshot {rev!r}"
    )
    alias = f" (TransformerLens's name for {name!r})" if repo != name else ""
    dl = f"`hf download {repo}" + ("`" if revision is None else f" --revision {rev}`")
    raise MissingRevisionError(
        f"revision {rev!r}{default} of hub model {repo!r}{alias} is not in the local Hugging Face "
        f"cache at {cached.folder} ({why}); cached there: {cached.describe()}. {offline_flag} is "
        f"set, so nothing is downloaded. Fix: pass one of the cached revisions (a ref name or a "
        f"snapshot commit), or download this one once with network ({dl})"
    )

"""Hugging Face Hub models: reference parsing, the short-name table, file selection, the local cache (no network),
and `pull` (the one place Hearth goes to the network).

Downloads and the cache layout are huggingface_hub's (`hf_hub_download` into the standard cache, so transformers and
vLLM share the files; it retries a dropped transfer with a Range request). Hearth adds what it needs on top: which
files a model needs (never pickles), GGUF quant tags as llama.cpp's `-hf` reads them, a SHA-256 check of every file
against the hub's listing, a disk-space check before the first byte, and one-line errors.

The environment is read at call time (HF_HUB_CACHE / HF_HOME, HF_ENDPOINT, HF_TOKEN), not at import, so a process can
point at another cache or hub without re-importing huggingface_hub.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from hearth.loader import ModelLoadError
from hearth.loader.resolve import PICKLE_SUFFIXES  # never fetched, whatever --include says

# top-level files a safetensors model needs: config, tokenizer, chat template, weights (subfolders such as gpt-oss's
# original/ and metal/ hold other copies of the weights and are left out unless --include names them)
HF_MODEL_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "*.safetensors", "model.safetensors.index.json",
)  # fmt: skip
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's -hf default when no tag is given


@dataclass(frozen=True, slots=True)
class ShortName:
    """A name from Hearth's table: the repo it pulls, the files it takes (None: the default selection) and the
    planner card that describes it."""

    repo: str
    card: str
    include: tuple[str, ...] | None = None


# Ollama-style names. Repos are the publishers' own (safetensors: gpt-oss in MXFP4, DeepSeek-V3/R1 in FP8, the
# R1 distills in bf16); cards are hearth/planner/cards/*.json.
SHORT_NAMES: dict[str, ShortName] = {
    "gpt-oss:20b": ShortName("openai/gpt-oss-20b", "gpt-oss-20b"),
    "gpt-oss:120b": ShortName("openai/gpt-oss-120b", "gpt-oss-120b"),
    "deepseek-r1:1.5b": ShortName("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-r1-distill-qwen-1.5b"),
    "deepseek-r1:7b": ShortName("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1-distill-qwen-7b"),
    "deepseek-r1:8b": ShortName("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-r1-distill-llama-8b"),
    "deepseek-r1:14b": ShortName("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "deepseek-r1-distill-qwen-14b"),
    "deepseek-r1:32b": ShortName("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "deepseek-r1-distill-qwen-32b"),
    "deepseek-r1:70b": ShortName("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "deepseek-r1-distill-llama-70b"),
    "deepseek-r1:671b": ShortName("deepseek-ai/DeepSeek-R1", "deepseek-r1"),
    "deepseek-v3": ShortName("deepseek-ai/DeepSeek-V3", "deepseek-v3"),
    "smollm2:135m": ShortName("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
}

_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<tag>[\w.-]+))?$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# the quant tag in a GGUF file name: Q4_K_M, IQ2_XXS, Q8_0, F16, BF16, MXFP4, UD-Q4_K_XL, ...
_TAG_IN_NAME_RE = re.compile(r"[-._]((?:UD-)?(?:I?Q\d\w*|T?Q\d\w*|F16|BF16|F32|MXFP4\w*))(?:-\d{5}-of-\d{5})?\.gguf$",
                             re.IGNORECASE)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HubRef:
    """A parsed hub reference: `repo` with an optional GGUF quant `tag`; `short` is the table entry it came from."""

    text: str
    repo: str
    tag: str | None = None
    short: ShortName | None = None


def parse_hub_ref(ref: str) -> HubRef | None:
    """A short name, `OWNER/NAME` or `OWNER/NAME:TAG`; None for anything else (paths, Ollama names)."""
    short = SHORT_NAMES.get(ref.lower())
    if short is not None:
        return HubRef(ref, short.repo, None, short)
    if ref.endswith(".gguf") or ref.startswith((".", "/", "~")):
        return None
    m = _REPO_RE.match(ref)
    if m is None or ".." in m["repo"]:
        return None
    return HubRef(ref, m["repo"], m["tag"])


# ---------------------------------------------------------------------------------------------------- environment


def hub_cache_dir() -> str:
    """The Hugging Face cache as huggingface_hub computes it, from the environment as it is now."""
    path = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        path = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(path))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


# the public hub serves large files from its own CDN domains; a mirror's (HF_ENDPOINT) CDN must be its own subdomains
HUB_CDN_DOMAINS = {"huggingface.co": ("huggingface.co", "hf.co")}


def endpoint_allows(url: str, endpoint: str | None = None) -> bool:
    """Whether `pull` may send a request to `url`: the endpoint's own host (any port, any scheme) or one of its
    subdomains (a mirror's CDN), plus the hub's CDN domains when the endpoint is the public hub."""
    from urllib.parse import urlsplit

    home = (urlsplit(endpoint or hub_endpoint()).hostname or "").lower()
    host = (urlsplit(url).hostname or "").lower()
    if not home or not host:
        return False
    domains = HUB_CDN_DOMAINS.get(home, (home,))
    return host == home or any(host == d or host.endswith("." + d) for d in domains)


@contextlib.contextmanager
def endpoint_only():
    """While it is open, huggingface_hub's HTTP requests (redirects included) go to the endpoint's hosts only
    (`endpoint_allows`); any other is refused with a HubError before it connects. Its Xet transfer (native code this
    check cannot see) is off meanwhile, so every byte comes over HTTP."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    endpoint = hub_endpoint()

    def check(request) -> None:
        if not endpoint_allows(str(request.url), endpoint):
            raise HubError(f"refusing a request to {request.url.host}: `hearth pull` talks to {endpoint} (HF_ENDPOINT) "
                           "and its own hosts only")  # fmt: skip

    def factory():
        client = _http.default_client_factory()
        client.event_hooks["request"] = [*client.event_hooks["request"], check]
        return client

    previous, xet = _http._GLOBAL_CLIENT_FACTORY, constants.HF_HUB_DISABLE_XET
    huggingface_hub.set_client_factory(factory)
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = xet
        huggingface_hub.set_client_factory(previous)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


# ------------------------------------------------------------------------------------------------ file selection


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def gguf_tags(names: list[str]) -> list[str]:
    """The quant tags of the GGUF files among `names`, as written in the names (split parts count once)."""
    tags: dict[str, str] = {}
    for name in names:
        m = _TAG_IN_NAME_RE.search(os.path.basename(name))
        if m:
            tags.setdefault(m[1].upper(), m[1])
    return sorted(tags.values(), key=str.upper)


def match_quant(names: list[str], tag: str) -> list[str]:
    """The GGUF file for `tag` (case-insensitive), or all parts of a split one (`-00001-of-0000N.gguf`), as
    llama.cpp's -hf picks it. Empty when nothing matches."""
    pattern = re.compile(rf"(?:^|[-._]){re.escape(tag)}(?:-\d{{5}}-of-\d{{5}})?\.gguf$", re.IGNORECASE)
    hits = sorted(n for n in names if pattern.search(os.path.basename(n)) and "mmproj" not in n.lower())
    if not hits:
        return []
    # a tag present both whole and split, or in several folders: keep the first group (whole file, or one split set)
    whole = [h for h in hits if not _SPLIT_RE.search(h)]
    if whole:
        return whole[:1]
    first = hits[0]
    total = _SPLIT_RE.search(first)[2]
    stem = _SPLIT_RE.sub("", first)
    return [h for h in hits if _SPLIT_RE.sub("", h) == stem and _SPLIT_RE.search(h)[2] == total]


def select_files(names: list[str], tag: str | None = None, include: list[str] | None = None,
                 short: ShortName | None = None) -> list[str]:  # fmt: skip
    """The files of a repo listing that a model needs. `include` globs replace the default selection; a GGUF repo
    takes the file (or split parts) of `tag` (default Q4_K_M, or its only GGUF file). Pickles never."""
    names = [n for n in names if not is_pickle(n)]
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower()]
    if include:
        chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)]
        if tag:
            chosen = [n for n in chosen if not n.lower().endswith(".gguf")] + match_quant(ggufs, tag)
        return sorted(set(chosen))
    if short is not None and short.include:
        return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in short.include))
    has_safetensors = any(n.endswith(".safetensors") and "/" not in n for n in names)
    if tag or (ggufs and not has_safetensors):
        if tag is None:
            tag = DEFAULT_QUANT if match_quant(ggufs, DEFAULT_QUANT) or len(ggufs) != 1 else None
        files = match_quant(ggufs, tag) if tag else ggufs
        if not files:
            available = ", ".join(gguf_tags(ggufs)) or "none: the repo has no GGUF files"
            raise HubError(f"no GGUF file for tag {tag!r} (available: {available})")
        return files
    return sorted(n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in HF_MODEL_PATTERNS))


class HubError(Exception):
    """A pull or cache failure, told in one line."""


# --------------------------------------------------------------------------------------------- the local cache


def _snapshot_dir(repo: str, revision: str | None = None) -> str | None:
    """The cached snapshot folder of `repo` at `revision` (default main), without network; None when not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True)
    except IncompleteSnapshotError as e:
        # another tool cached a fuller listing than Hearth fetched (e.g. without original/): the folder may still
        # hold everything a model needs, which the caller checks
        return str(e.snapshot_path) if getattr(e, "snapshot_path", None) else None
    except (LocalEntryNotFoundError, ValueError, OSError):
        pass
    if revision is not None:
        return None
    # no refs/main (pulled with --revision): the newest snapshot
    from huggingface_hub.file_download import repo_folder_name

    try:
        snapshots = os.path.join(hub_cache_dir(), repo_folder_name(repo_id=repo, repo_type="model"), "snapshots")
        folders = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
    except (OSError, ValueError):
        return None
    return max(folders, key=os.path.getmtime, default=None)


def _listing(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(out)


def local_hub_model(ref: str) -> tuple[str, str] | None:
    """(path, format) of a hub reference found in the local cache: an HF folder ("hf") or a GGUF file ("gguf").
    None when `ref` is not a hub reference or not cached; ModelLoadError when cached but not runnable."""
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    folder = _snapshot_dir(hub_ref.repo)
    if folder is None or not os.path.isdir(folder):
        return None
    names = _listing(folder)
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower()]
    if hub_ref.tag is None and os.path.isfile(os.path.join(folder, "config.json")):
        if any(n.endswith(".safetensors") and "/" not in n for n in names):
            return folder, "hf"
        if not ggufs:
            raise ModelLoadError(ref, f"cached at {folder} without weights (`hearth pull {ref}` fetches them)")
    if not ggufs:
        return None
    if hub_ref.tag is None:
        files = match_quant(ggufs, DEFAULT_QUANT) or (ggufs if len(gguf_tags(ggufs)) <= 1 else [])
        if not files:
            raise ModelLoadError(ref, f"several quantizations cached; add a tag: {', '.join(gguf_tags(ggufs))}")
    else:
        files = match_quant(ggufs, hub_ref.tag)
        if not files:
            raise ModelLoadError(ref, f"no cached GGUF file for tag {hub_ref.tag!r} (cached: "
                                      f"{', '.join(gguf_tags(ggufs)) or 'none'}; `hearth pull {ref}` fetches it)")  # fmt: skip
    return os.path.join(folder, files[0]), "gguf"  # a split model: its first part (the loader opens them all)


def cached_repos() -> list[dict]:
    """Models in the HF cache that Hearth can run: safetensors folders with a config, and GGUF repos (one row per
    quant tag). Each row: name (what `hearth run` takes), repo, path, size, format."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError, ValueError):
        return []
    short_of = {s.repo.lower(): name for name, s in SHORT_NAMES.items()}
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = repo.refs.get("main") or max(repo.revisions, key=lambda r: r.last_modified)
        files = {f.file_path.relative_to(revision.snapshot_path).as_posix(): f for f in revision.files}
        names = sorted(files)
        folder = str(revision.snapshot_path)
        if (
            "config.json" in files
            and any(n.endswith(".safetensors") and "/" not in n for n in names)
            and _runnable_config(os.path.join(folder, "config.json"))
        ):
            size = sum(f.size_on_disk for n, f in files.items() if "/" not in n)
            rows.append({"name": short_of.get(repo.repo_id.lower(), repo.repo_id), "repo": repo.repo_id,
                         "path": folder, "size": size, "format": "safetensors"})  # fmt: skip
        ggufs = [n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower()]
        for tag in gguf_tags(ggufs):
            parts = match_quant(ggufs, tag)
            rows.append({"name": f"{repo.repo_id}:{tag}", "repo": repo.repo_id, "path": os.path.join(folder, parts[0]),
                         "size": sum(files[p].size_on_disk for p in parts),
                         "format": "gguf" + (f" ({len(parts)} parts)" if len(parts) > 1 else "")})  # fmt: skip
    return rows


def _runnable_config(path: str) -> bool:
    """Whether a cached config.json names an architecture Hearth has model code for."""
    import json

    from hearth.config import ARCHITECTURES

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type") in ARCHITECTURES
    except (OSError, ValueError, AttributeError):
        return False


def remove_repo(repo: str, confirm: Callable[[str], bool], out=None) -> int:
    """Delete every cached revision of `repo` after `confirm(question)`; returns the bytes freed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    out = out or sys.stdout
    try:
        info = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError):
        info = None
    found = [r for r in (info.repos if info else ()) if r.repo_type == "model" and r.repo_id.lower() == repo.lower()]
    if not found:
        raise HubError(f"{repo} is not in the Hugging Face cache at {hub_cache_dir()}")
    cached = found[0]
    strategy = info.delete_revisions(*(r.commit_hash for r in cached.revisions))
    if not confirm(f"Remove {cached.repo_id} ({_gb(strategy.expected_freed_size)}, {len(cached.revisions)} "
                   f"revision(s)) from {hub_cache_dir()}?"):  # fmt: skip
        return 0
    strategy.execute()
    shutil.rmtree(cached.repo_path, ignore_errors=True)  # refs/, .no_exist/ left behind by the strategy
    print(f"removed {cached.repo_id} ({_gb(strategy.expected_freed_size)})", file=out)
    return strategy.expected_freed_size


# --------------------------------------------------------------------------------------------------------- pull


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def file_digest(path: str, algorithm: str, git_size: int | None = None) -> str:
    """sha256 of a file, or with `git_size` its git blob id (sha1 of "blob SIZE\\0" + content)."""
    h = hashlib.new(algorithm)
    if git_size is not None:
        h.update(f"blob {git_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(slots=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 (the etag of non-LFS files)

    @property
    def etag(self) -> str | None:
        return self.sha256 or self.blob_id


@dataclass(slots=True)
class PullPlan:
    """What a pull would fetch: resolved commit, files, bytes still to download."""

    ref: HubRef
    commit: str
    files: list[RemoteFile]
    missing_bytes: int
    storage: str  # the repo's folder in the cache
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _hub_errors(ref: HubRef, revision: str | None):
    """Turn huggingface_hub and network failures into one-line HubErrors."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        message = _describe(e, ref, revision)
        if message is None:
            raise
        raise HubError(message) from None


def _describe(e: BaseException, ref: HubRef, revision: str | None) -> str | None:
    """One line for a failure, from the most telling exception in its chain (huggingface_hub wraps the HTTP or
    connection error that caused a failed download in ValueError / LocalEntryNotFoundError); None if not ours."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain, err = [], e
    while err is not None and len(chain) < 8:
        chain.append(err)
        err = err.__cause__ or (err.__context__ if not err.__suppress_context__ else None)
    endpoint = hub_endpoint()
    for err in chain:
        if isinstance(err, GatedRepoError):
            return (f"{ref.repo} is gated: accept its terms at {endpoint}/{ref.repo} and set HF_TOKEN to a token of "
                    "that account")  # fmt: skip
        if isinstance(err, RepositoryNotFoundError):
            hint = "" if os.environ.get("HF_TOKEN") else " (if it is private, set HF_TOKEN)"
            return f"no such repo on {endpoint}: {ref.repo}{hint}"
        if isinstance(err, RevisionNotFoundError):
            return f"{ref.repo} has no revision {revision!r}"
        if isinstance(err, RemoteEntryNotFoundError):
            return f"{ref.repo}: a listed file is missing on the hub ({_first_line(err)})"
        if isinstance(err, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it for `hearth pull`"
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code if err.response is not None else "?"
            if status in (401, 403):
                return f"{endpoint} refused access to {ref.repo} (HTTP {status}): set HF_TOKEN to a token that may read it"
            return f"{endpoint} answered HTTP {status} for {ref.repo}"
        if isinstance(err, (httpx2.ConnectError, httpx2.TimeoutException)):
            return f"cannot reach {endpoint}: {_first_line(err)}"
        if isinstance(err, httpx2.HTTPError):
            return f"network error talking to {endpoint}: {_first_line(err)}"
    if any(isinstance(err, LocalEntryNotFoundError) for err in chain):
        return f"cannot reach {endpoint}: {_first_line(chain[-1])}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _api():
    from huggingface_hub import HfApi, get_token

    return HfApi(endpoint=hub_endpoint(), token=get_token() or False)


def plan_pull(ref: HubRef, revision: str | None = None, include: list[str] | None = None) -> PullPlan:
    """List the repo (one API call) and choose its files; no download."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise HubError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it for `hearth pull`")
    from huggingface_hub.file_download import repo_folder_name

    with _hub_errors(ref, revision):
        info = _api().model_info(ref.repo, revision=revision, files_metadata=True)
    if info.gated and not _api().token:
        raise HubError(f"{ref.repo} is gated: accept its terms at {hub_endpoint()}/{ref.repo} and set HF_TOKEN to a "
                       "token of that account")  # fmt: skip
    siblings = info.siblings or []
    remote = {s.rfilename: RemoteFile(s.rfilename, (s.lfs.size if s.lfs else s.size) or 0,
                                      s.lfs.sha256 if s.lfs else None, s.blob_id) for s in siblings}  # fmt: skip
    names = sorted(remote)
    chosen = select_files(names, ref.tag, include, ref.short)
    if not chosen:
        what = f"--include {' '.join(include)}" if include else "the model files (config, tokenizer, weights)"
        raise HubError(f"{ref.repo}: nothing to download matching {what}")
    notes = []
    skipped = [n for n in names if is_pickle(n)]
    if skipped:
        notes.append(f"skipping {len(skipped)} pickle file(s) (loading them runs code)")
    storage = os.path.join(hub_cache_dir(), repo_folder_name(repo_id=ref.repo, repo_type="model"))
    files = [remote[n] for n in chosen]
    missing = sum(f.size for f in files if not (f.etag and os.path.isfile(os.path.join(storage, "blobs", f.etag))))
    return PullPlan(ref, info.sha, files, missing, storage, notes)


def check_disk_space(plan: PullPlan) -> None:
    """Refuse before downloading when the cache's file system has less free space than the files still to fetch."""
    path = plan.storage
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    free = shutil.disk_usage(path).free
    if plan.missing_bytes > free:
        raise HubError(f"not enough disk space: {plan.ref.repo} needs {_gb(plan.missing_bytes)} more at "
                       f"{hub_cache_dir()}, {_gb(free)} free")  # fmt: skip


def fit_report(plan: PullPlan) -> tuple[bool | None, list[str]]:
    """What `hearth plan` says about this model on this machine: (fits, lines). fits is None when unknown. The
    config is the short name's card, else the repo's config.json (fetched first, it is small); GGUF repos without
    a card are judged by file size against usable memory."""
    from hearth.planner.hardware import get_hardware
    from hearth.planner.plan import plan as make_plan
    from hearth.planner.plan import usable_bytes

    hw = get_hardware("auto")
    weights = [f for f in plan.files if f.name.endswith((".safetensors", ".gguf"))]
    weight_bytes = sum(f.size for f in weights) or None
    is_gguf = any(f.name.endswith(".gguf") for f in weights)
    config = None
    if plan.ref.short is not None:
        from hearth.planner.cards import load_card

        card = load_card(plan.ref.short.card)
        config = card.config if card else None
    elif not is_gguf and any(f.name == "config.json" for f in plan.files):
        import json

        from huggingface_hub import hf_hub_download

        with _hub_errors(plan.ref, plan.commit):
            path = hf_hub_download(plan.ref.repo, "config.json", revision=plan.commit, cache_dir=hub_cache_dir(),
                                   endpoint=hub_endpoint(), token=_api().token)  # fmt: skip
        try:
            from hearth.config import ModelConfig

            with open(path, encoding="utf-8") as f:
                config = ModelConfig.from_hf(json.load(f))
        except Exception as e:  # an architecture the planner does not know: no estimate, not a failure
            return None, [f"plan: no estimate for this config ({_first_line(e)})"]
    if config is not None:
        try:
            p = make_plan(config, hw, model=plan.ref.repo, weights_bytes_override=weight_bytes)
        except Exception as e:
            return None, [f"plan: no estimate ({_first_line(e)})"]
        params = f"{p.params_total / 1e9:.2f}B" if p.params_total >= 1e9 else f"{p.params_total / 1e6:.1f}M"
        lines = [f"plan: {params} parameters, {_gb(p.weights_bytes)} weights, needs "
                 f"{_gb(p.memory_bytes)} at {p.context} tokens; {p.hardware} has {_gb(p.usable_bytes)} usable: "
                 + ("fits" if p.fits else "does NOT fit") + (f", ~{p.decode_tok_s:,.1f} tok/s" if p.fits else "")]  # fmt: skip
        return p.fits, lines
    if weight_bytes:
        usable = usable_bytes(hw)
        fits = weight_bytes <= usable
        return fits, [f"plan: {_gb(weight_bytes)} of weights; {hw.label} has {_gb(usable)} usable: "
                      + ("fits (before the KV cache)" if fits else "does NOT fit")]  # fmt: skip
    return None, ["plan: no weights among the selected files"]


def _file_bar(overall, name: str):
    """A tqdm class for huggingface_hub's bar of file `name` that also advances the `overall` bar."""
    from tqdm.auto import tqdm

    class FileBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's bar naming, unknown to plain tqdm
            kwargs.update(desc=name if len(name) <= 40 else f"…{name[-39:]}", leave=False, disable=overall.disable)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                overall.update(n)
            return super().update(n)

        # huggingface_hub reports network bytes apart from bytes written (Xet downloads) to a bar that has these;
        # with them, one bar per file counts written bytes only, and the overall bar counts nothing twice
        def update_transfer(self, n=1):
            pass

        def set_transfer_postfix_str(self, postfix, refresh=False):
            pass

    return FileBar


def _verify(path: str, f: RemoteFile) -> str | None:
    """None when the file at `path` matches the hub's hash, else the hash it has."""
    if f.sha256:
        got = file_digest(path, "sha256")
        return None if got == f.sha256 else got
    if f.blob_id:
        got = file_digest(path, "sha1", git_size=os.path.getsize(path))
        return None if got == f.blob_id else got
    return None


def _discard(pointer: str) -> None:
    blob = os.path.realpath(pointer)
    for p in (pointer, blob):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def download(plan: PullPlan, revision: str | None = None, err=None) -> str:
    """Fetch the planned files into the cache, verifying each against the hub's hash (a mismatch is deleted and
    fetched once more, then an error). Records `revision` (default main) → commit. Returns the snapshot folder."""
    from huggingface_hub import hf_hub_download
    from tqdm.auto import tqdm

    err = err or sys.stderr
    token = _api().token
    disable = _env_true("HF_HUB_DISABLE_PROGRESS_BARS") or plan.missing_bytes == 0
    with tqdm(total=plan.missing_bytes, unit="B", unit_scale=True, desc=f"pull {plan.ref.repo}", file=err,
              disable=disable) as overall:  # fmt: skip
        for f in plan.files:
            bar = _file_bar(overall, f.name)
            for attempt in (0, 1):
                with _hub_errors(plan.ref, plan.commit):
                    path = hf_hub_download(plan.ref.repo, f.name, revision=plan.commit, cache_dir=hub_cache_dir(),
                                           endpoint=hub_endpoint(), token=token, tqdm_class=bar,
                                           force_download=attempt > 0)  # fmt: skip
                got = _verify(path, f)
                if got is None:
                    break
                _discard(path)
                algo = "sha256" if f.sha256 else "git sha1"
                if attempt:
                    raise HubError(f"corrupted download: {f.name} has {algo} {got[:16]}…, the hub lists "
                                   f"{f.etag[:16]}…; deleted it (fetched twice)")  # fmt: skip
                overall.write(f"{f.name}: {algo} mismatch, deleted; fetching it again", file=err)
    snapshot = os.path.join(plan.storage, "snapshots", plan.commit)
    ref_name = revision or "main"
    if ref_name != plan.commit:
        refs = os.path.join(plan.storage, "refs", *ref_name.split("/"))
        os.makedirs(os.path.dirname(refs), exist_ok=True)
        tmp = f"{refs}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(plan.commit)
        os.replace(tmp, refs)
    return snapshot

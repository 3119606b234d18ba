"""GGUF files that other local runtimes already downloaded: Ollama's store and LM Studio's model folders. Read-only:
Hearth lists and loads these files in place and never writes, moves or deletes them.

Ollama (`$OLLAMA_MODELS`, default ~/.ollama/models): manifests/HOST/NAMESPACE/NAME/TAG is a JSON manifest whose layer
with mediaType application/vnd.ollama.image.model names the GGUF blob (blobs/sha256-HEX). Names as Ollama prints them:
`NAME:TAG` for the default registry's library, `NAMESPACE/NAME:TAG` otherwise.

LM Studio (~/.lmstudio/models and ~/.cache/lm-studio/models): OWNER/REPO/*.gguf, as on the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os

from hearth.loader import ModelLoadError

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"


def ollama_dir() -> str:
    return os.path.expanduser(os.environ.get("OLLAMA_MODELS") or os.path.join("~", ".ollama", "models"))


def lmstudio_dirs() -> list[str]:
    home = os.path.expanduser("~")
    return [os.path.join(home, ".lmstudio", "models"), os.path.join(home, ".cache", "lm-studio", "models")]


def _ollama_manifest_path(name: str) -> str:
    """The manifest file for an Ollama name: `NAME[:TAG]`, `NS/NAME[:TAG]` or `HOST/NS/NAME[:TAG]`."""
    base, _, tag = name.partition(":") if name.count(":") <= 1 else name.rpartition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    if len(parts) != 3 or any(p in ("", ".", "..") for p in [*parts, tag or "latest"]) or "/" in (tag or ""):
        raise ValueError(name)
    return os.path.join(ollama_dir(), "manifests", *parts, tag or "latest")


def _ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    if host == OLLAMA_REGISTRY:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def _ollama_blob(manifest_path: str) -> tuple[str, int]:
    """(blob path, size) of the model layer of a manifest; ModelLoadError when it has none or the blob is gone."""
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        layer = next(x for x in manifest["layers"] if x.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE)
        digest = layer["digest"]
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise ModelLoadError(manifest_path, "not an Ollama manifest with a model layer") from None
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not hexdigest.isalnum():
        raise ModelLoadError(manifest_path, f"unexpected layer digest {digest!r}")
    blob = os.path.join(ollama_dir(), "blobs", f"sha256-{hexdigest}")
    if not os.path.isfile(blob):
        raise ModelLoadError(manifest_path, f"the model blob {blob} is missing")
    return blob, int(layer.get("size") or os.path.getsize(blob))


def ollama_model(name: str) -> str | None:
    """The GGUF blob behind an Ollama name, or None when Ollama has no such model."""
    try:
        manifest = _ollama_manifest_path(name)
    except ValueError:
        return None
    if not os.path.isfile(manifest):
        return None
    return _ollama_blob(manifest)[0]


def ollama_models() -> list[dict]:
    root = os.path.join(ollama_dir(), "manifests")
    rows = []
    if not os.path.isdir(root):
        return rows
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root).split(os.sep)
        if len(rel) != 3:
            continue
        for tag in sorted(files):
            name = _ollama_name(*rel, tag)
            try:
                blob, size = _ollama_blob(os.path.join(dirpath, tag))
            except ModelLoadError:
                continue
            rows.append({"name": f"ollama:{name}", "path": blob, "size": size, "format": "gguf", "kind": "ollama"})
    return sorted(rows, key=lambda r: r["name"])


def lmstudio_model(ref: str) -> str | None:
    """A GGUF file in LM Studio's folders: `OWNER/REPO` (its one GGUF file), `OWNER/REPO:TAG`, or
    `OWNER/REPO/FILE.gguf`. None when not there."""
    from hearth.loader.hub import gguf_tags, match_quant

    base, _, tag = ref.partition(":")
    parts = base.split("/")
    if len(parts) not in (2, 3) or any(p in ("", ".", "..") for p in parts):
        return None
    for root in lmstudio_dirs():
        folder = os.path.join(root, parts[0], parts[1])
        if not os.path.isdir(folder):
            continue
        if len(parts) == 3:
            path = os.path.join(folder, parts[2])
            if os.path.isfile(path):
                return path
            continue
        ggufs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
        if tag:
            hits = match_quant(ggufs, tag)
        else:
            hits = ggufs if len(ggufs) == 1 else []
            if len(ggufs) > 1:
                raise ModelLoadError(ref, f"LM Studio has several GGUF files here; add a tag: {', '.join(gguf_tags(ggufs))}")
        if hits:
            return os.path.join(folder, hits[0])
    return None


def lmstudio_models() -> list[dict]:
    from hearth.loader.hub import _TAG_IN_NAME_RE

    rows, seen = [], set()
    for root in lmstudio_dirs():
        if not os.path.isdir(root):
            continue
        for owner in sorted(os.listdir(root)):
            owner_dir = os.path.join(root, owner)
            if not os.path.isdir(owner_dir):
                continue
            for repo in sorted(os.listdir(owner_dir)):
                folder = os.path.join(owner_dir, repo)
                if not os.path.isdir(folder):
                    continue
                ggufs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
                for f in ggufs:
                    m = _TAG_IN_NAME_RE.search(f)
                    name = f"lmstudio:{owner}/{repo}" + (f":{m[1]}" if m else f"/{f}")
                    if len(ggufs) == 1:
                        name = f"lmstudio:{owner}/{repo}"
                    if name in seen:
                        continue
                    seen.add(name)
                    path = os.path.join(folder, f)
                    rows.append({"name": name, "path": path, "size": os.path.getsize(path), "format": "gguf",
                                 "kind": "lmstudio"})  # fmt: skip
    return rows

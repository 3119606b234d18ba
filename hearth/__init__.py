"""Hearth: run open-weight language models on your own hardware, with an OpenAI-compatible server."""

from hearth.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; keep `import hearth` light for the CLI
    if name == "LLM":
        from hearth.llm import LLM

        return LLM
    raise AttributeError(name)

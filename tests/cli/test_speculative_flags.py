"""The speculative-decoding flags of serve/run/bench reach EngineConfig, which checks them."""

from __future__ import annotations

import argparse

import pytest

from hearth.cli.serve import add_speculative_args, speculative_kwargs
from hearth.config import EngineConfig


def test_speculative_config_is_checked_and_the_cli_flags_reach_it():
    assert EngineConfig(draft_model="smollm2").speculative == "draft"
    for bad in (dict(speculative="eagle"), dict(speculative="draft"), dict(speculative="ngram", num_speculative_tokens=0),
                dict(speculative="ngram", prompt_lookup_min=4, prompt_lookup_max=2),
                dict(speculative="ngram", speculative_max_batch=0)):  # fmt: skip
        with pytest.raises(ValueError):
            EngineConfig(**bad)
    parser = argparse.ArgumentParser()
    add_speculative_args(parser)
    args = parser.parse_args(["--speculative", "ngram", "--num-speculative-tokens", "6"])
    config = EngineConfig(**speculative_kwargs(args))
    assert (config.speculative, config.num_speculative_tokens, config.speculative_max_batch) == ("ngram", 6, 2)
    assert speculative_kwargs(parser.parse_args([])) == {}

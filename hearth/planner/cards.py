"""Model cards: published `config.json` values (no weights) shipped as hearth/planner/cards/*.json, with source and
licence, so `hearth plan` / `hearth show` / `hearth list` know the big models before anything is downloaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from hearth.config import ModelConfig

CARDS_DIR = os.path.join(os.path.dirname(__file__), "cards")


@dataclass(slots=True)
class Card:
    name: str
    source: str  # where the config values come from
    license: str
    hf_config: dict[str, Any]  # an HF-style config.json dict
    notes: str = ""
    _config: ModelConfig | None = field(default=None, repr=False)

    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            self._config = ModelConfig.from_hf(self.hf_config)
        return self._config


def _read(path: str) -> Card:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return Card(data["name"], data["source"], data["license"], data["config"], data.get("notes", ""))


def list_cards() -> list[Card]:
    return [_read(os.path.join(CARDS_DIR, f)) for f in sorted(os.listdir(CARDS_DIR)) if f.endswith(".json")]


def load_card(name: str) -> Card | None:
    """The card called `name` (case-insensitive), or None."""
    path = os.path.join(CARDS_DIR, f"{name.lower()}.json")
    if os.path.sep in name or not os.path.isfile(path):
        return None
    return _read(path)

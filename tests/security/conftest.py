"""Security tests: every one runs in its own $HEARTH_HOME and never sends a packet off the machine."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch) -> str:
    path = tmp_path / "hearth-home"
    monkeypatch.setenv("HEARTH_HOME", str(path))
    return str(path)


@pytest.fixture
def fast_kdf(monkeypatch) -> None:
    """Cheaper scrypt for tests that make many keys; test_keys.py checks the real parameters."""
    from hearth.governance import keys

    monkeypatch.setattr(keys, "SCRYPT_N", 2**10)


@pytest.fixture(autouse=True)
def restore_hearth_logging():
    """`main()` sets up the `hearth` logger (its own stderr handler, no propagation); undo it after each test."""
    import logging

    logger = logging.getLogger("hearth")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]

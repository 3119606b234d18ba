"""layers/context.py: each thread has its own step context, so two engines (one per loaded model, each stepping on its
own thread) never read each other's slot mapping."""

from __future__ import annotations

import threading

import torch

from hearth.layers.context import Context, get_context, reset_context, set_context


def test_a_context_set_on_one_thread_is_not_seen_on_another() -> None:
    mine = Context(slot_mapping=torch.arange(5))
    set_context(mine)
    ready, checked = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def other() -> None:
        seen["before"] = get_context()
        set_context(Context(slot_mapping=torch.arange(1)))
        ready.set()
        checked.wait(5)
        seen["after"] = get_context()

    t = threading.Thread(target=other)
    t.start()
    ready.wait(5)
    assert get_context() is mine  # the other thread's set_context did not replace this thread's
    checked.set()
    t.join(5)
    assert seen["before"] is not mine and seen["before"].slot_mapping is None
    assert seen["after"].slot_mapping.numel() == 1
    reset_context()
    assert get_context().slot_mapping is None

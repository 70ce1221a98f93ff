"""Swapping while the offline `LLM` generates (issue 10, item 7): `generate` blocks its thread,
a swap from another thread is applied by its loop at a step boundary, logged with slot, old
and new plugin and step, and no request is lost."""

from __future__ import annotations

import logging
import threading

from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.plugins.scheduling.fcfs import FCFSScheduler
from pegboard.sdk.types import SamplingParams


class Signalling(FCFSScheduler):
    """FCFS that tells the test when the engine is stepping, and waits until it may go on."""

    name = "signalling"
    stepping = threading.Event()
    may_go_on = threading.Event()

    def schedule(self, waiting, running, budget, kv):
        if not Signalling.stepping.is_set():
            Signalling.stepping.set()
            Signalling.may_go_on.wait(timeout=60)
        return super().schedule(waiting=waiting, running=running, budget=budget, kv=kv)


def test_a_swap_from_another_thread_is_applied_by_generate_and_logged(tiny_llama_dir, caplog):
    pm = PluginManager()
    pm.add(Signalling)
    llm = LLM(str(tiny_llama_dir), plugins=pm, dtype="float32", device="cpu",
              scheduler="signalling")  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]
    results = {}
    try:
        with caplog.at_level(logging.INFO, logger="pegboard.engine"):
            worker = threading.Thread(
                target=lambda: results.update(outs=llm.generate(prompts, params))
            )
            worker.start()
            assert Signalling.stepping.wait(timeout=60)  # generate is inside a step
            future = llm.swap("scheduler", "sjf")
            Signalling.may_go_on.set()
            result = future.result(timeout=120)  # resolved by generate's own loop
            worker.join(timeout=120)
        assert (result.slot, result.previous, result.active) == ("scheduler", "signalling", "sjf")
        assert result.step is not None and result.step >= 1
        assert f"swapped scheduler: 'signalling' -> 'sjf' at step {result.step}" in caplog.text
        assert llm.engine.plugins.active("scheduler").name == "sjf"
        outs = results["outs"]
        assert [len(o.token_ids) for o in outs] == [6] * 4 and all(o.error is None for o in outs)
    finally:
        Signalling.may_go_on.set()
        llm.close()

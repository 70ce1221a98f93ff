"""The documented `Patch` example (docs/plugins.md §6 and `pegboard.sdk.patch`'s docstring),
taken verbatim from the text, imports and works (issue 10, item 4): the whole patch's gates
must not shadow the `@requires` decorator."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from pegboard.core.engine import Engine
from pegboard.core.llm import LLM
from pegboard.core.patches import apply_patches
from pegboard.sdk import Patch, patch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def docs_example() -> str:
    section = DOCS.read_text().split("## 6. Patches", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def docstring_example() -> str:
    doc = patch.__doc__
    block = doc.split("may replace methods of a core class:\n\n", 1)[1].split("\nThe whole", 1)[0]
    return textwrap.dedent(block)


@pytest.mark.parametrize("source", [docs_example, docstring_example], ids=["docs", "docstring"])
def test_the_documented_patch_example_runs_verbatim(source, tiny_llama_dir, tmp_path):
    namespace: dict = {}
    exec(compile(source(), f"<{source.__name__}>", "exec"), namespace)  # the text as written
    quiet = namespace["QuietExport"]
    assert issubclass(quiet, Patch) and quiet.target is Engine
    assert quiet.requires == {"pegboard": ">=0.1,<0.5"}
    assert quiet.methods()["_export"].__pegboard_requires__ == {"torch": ">=2.5"}

    original = Engine.__dict__["_export"]
    report = apply_patches([quiet])
    try:
        assert report.applied == ["QuietExport"] and not report.skipped
        assert Engine.__dict__["_export"] is not original
        log = tmp_path / "metrics.jsonl"
        llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", metrics=["jsonl"],
                  plugin_options={"jsonl": {"path": str(log), "flush_interval_s": 0}})  # fmt: skip
        try:
            [out] = llm.generate([[5, 6, 7]], None)
        finally:
            llm.close()
        kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
        assert kinds == ["request"] and out.error is None  # step snapshots were silenced
    finally:
        report.unapply()
    assert Engine.__dict__["_export"] is original


def test_a_class_keyword_and_a_class_attribute_for_the_same_gates_is_an_error():
    with pytest.raises(TypeError, match="both as a class keyword and as a class attribute"):

        class Both(Patch, target=Engine, requires={"pegboard": ">=0.1"}):
            requires = {"pegboard": ">=0.1"}

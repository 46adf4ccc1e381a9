"""Every ```python block in the README and docs/ runs as written, in order, per file."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for i, block in enumerate(_blocks(path)):
        code = compile(block, f"{path.name}[block {i}]", "exec")
        exec(code, namespace)  # a failure names the file and block


def test_every_doc_with_code_is_covered() -> None:
    covered = {p.name for p in DOCS if _blocks(p)}
    assert {"README.md", "quickstart.md", "guide.md"} <= covered
    assert os.path.isfile(ROOT / "format_spec" / "SPEC.md")


def test_api_reference_matches_the_code() -> None:
    import dataclasses

    import llminstr
    from llminstr import errors

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in re.findall(r"^## `llminstr\.(\w+)`", text, re.M):
        # a name of the package, or one of its modules (llminstr.tools)
        assert hasattr(llminstr, name) or importlib.util.find_spec(f"llminstr.{name}"), (
            f"docs/api.md documents llminstr.{name}, which does not exist"
        )
    import llminstr.tools

    for fn in ("summary", "validate", "convert", "repair"):
        assert callable(getattr(llminstr.tools, fn)), fn
    fields = {f.name for f in dataclasses.fields(llminstr.InstrumentationConfig)}
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert fields == documented, (
        f"undocumented: {fields - documented}; stale: {documented - fields}"
    )
    import builtins

    for err in re.findall(r"`(\w+Error)`", text):
        assert hasattr(errors, err) or hasattr(builtins, err), err
        if hasattr(errors, err):  # "importable from llminstr too"
            assert getattr(llminstr, err) is getattr(errors, err)
            assert err in llminstr.__all__

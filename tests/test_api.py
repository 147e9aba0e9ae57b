"""docs/api.md and ``entangle.__all__`` agree: every documented name imports from where the page says it does."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import entangle

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEADING = re.compile(r"^### `([A-Za-z_][\w.]*)`\s*$", re.M)


def documented() -> list[str]:
    """The names of docs/api.md's ``### `name``` headings, in page order."""
    names = HEADING.findall(API_MD.read_text(encoding="utf-8"))
    assert names, f"no '### `name`' headings found in {API_MD}"
    return names


def resolve(path: str) -> object:
    """The object at a dotted path ``entangle.module[.attribute]``: a module, or an attribute of the longest module
    prefix that imports."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside the module
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


TOP_LEVEL = [name for name in documented() if "." not in name]
DOTTED = [name for name in documented() if "." in name]


def test_the_page_documents_both_kinds_of_heading():
    assert {"load_pairs", "pair_frame", "batch_weights", "make_report"} <= set(TOP_LEVEL)
    assert "entangle.verify.make_step_fn" in DOTTED


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_documented_top_level_name_is_exported(name):
    assert name in entangle.__all__, f"docs/api.md documents `{name}` as importable from entangle, but it is not in " \
                                     "entangle.__all__ (add it to _EXPORTS in entangle/__init__.py)"
    assert getattr(entangle, name) is not None


@pytest.mark.parametrize("path", DOTTED)
def test_documented_module_path_imports(path):
    assert path.startswith("entangle."), f"docs/api.md heading `{path}` is not a path inside entangle"
    try:
        resolve(path)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"docs/api.md documents `{path}`, which does not import: {exc}")


def test_every_exported_name_is_documented():
    """An exported name has its own heading, or a module-path heading for the same object."""
    by_dotted = {path.rsplit(".", 1)[1]: path for path in DOTTED}
    missing = [name for name in entangle.__all__ if name not in TOP_LEVEL
               and not (name in by_dotted and resolve(by_dotted[name]) is getattr(entangle, name))]
    assert not missing, f"entangle.__all__ names with no '### `name`' heading in docs/api.md: {missing}"


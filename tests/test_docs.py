"""The docs stay true to the code: every config key is in the reference, every link points at a file."""

from __future__ import annotations

import dataclasses
import re

from pixelflow.config import Config
from tests.conftest import REPO


def schema_keys(node=Config, prefix: str = "") -> list[str]:
    keys = []
    for item in dataclasses.fields(node):
        kind = item.default_factory() if item.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(type(kind), f"{prefix}{item.name}.")
        else:
            keys.append(f"{prefix}{item.name}")
    return keys


def test_every_config_key_is_in_the_config_reference():
    reference = (REPO / "docs" / "configs.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+)` \|", reference, re.M))
    keys = schema_keys()
    assert len(keys) > 90
    assert sorted(set(keys) - listed) == []  # a new key needs its row
    assert sorted(listed - set(keys)) == []  # a removed key loses its row


def test_links_in_the_readme_and_docs_point_at_files_that_exist():
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            assert (page.parent / target).exists(), (page.name, target)

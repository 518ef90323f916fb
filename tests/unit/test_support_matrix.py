"""The README's support matrix is exactly what ``python -m xdit_multigpu.models.matrix`` renders."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from xdit_multigpu.models.matrix import BEGIN, END, render

pytestmark = pytest.mark.unit


def test_readme_contains_rendered_matrix() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert render() in readme, "README support matrix is stale: run python -m xdit_multigpu.models.matrix"


def test_every_family_has_a_row() -> None:
    table = render()
    for name in ("Flux", "SD3", "SDXL", "PixArt", "HunyuanDiT", "Chroma", "Qwen-Image"):
        assert f"| {name}" in table

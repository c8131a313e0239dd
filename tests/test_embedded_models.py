"""Embedded models are built from a fixed seed without touching the caller's random stream."""

from __future__ import annotations

import torch

from conceptflow.fileio import directory_md5
from conceptflow.models.embedded import embedded_model_path


def test_a_cold_build_leaves_the_callers_stream_and_gives_the_same_weights(tmp_path, monkeypatch):
    torch.manual_seed(123)
    expected = torch.rand(4)

    monkeypatch.setenv("CONCEPTFLOW_CACHE", str(tmp_path / "first"))
    torch.manual_seed(123)
    first = embedded_model_path("embedded:tiny-dino")  # cold cache: built here
    assert torch.equal(torch.rand(4), expected)  # as with a warm cache, where nothing is built

    monkeypatch.setenv("CONCEPTFLOW_CACHE", str(tmp_path / "second"))
    torch.manual_seed(7)  # another caller state: the build does not depend on it
    second = embedded_model_path("embedded:tiny-dino")
    assert directory_md5(first) == directory_md5(second)
    assert embedded_model_path("embedded:tiny-dino") == second  # warm: the finished build is reused
    assert [p.name for p in (tmp_path / "second").iterdir()] == [second.name]  # no staging left behind

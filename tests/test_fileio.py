"""Atomic writes and content hashes (conceptflow.fileio)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from conceptflow.fileio import atomic_directory, atomic_path, file_md5


def test_keep_name_stages_under_the_destinations_own_name(tmp_path):
    destination = tmp_path / "vae.pt"
    with atomic_path(destination, keep_name=True) as temporary:
        assert temporary.name == "vae.pt" and temporary.parent != tmp_path
        torch.save({"a": torch.ones(2)}, temporary)
    assert zipfile.ZipFile(destination).namelist()[0] == "vae/data.pkl"  # torch.save names it after the stem
    assert [p.name for p in tmp_path.iterdir()] == ["vae.pt"]


@pytest.mark.parametrize("keep_name", [False, True])
def test_a_failed_write_leaves_nothing_behind(tmp_path, keep_name):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.txt", keep_name=keep_name) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_keep_existing_keeps_the_first_finished_build(tmp_path):
    destination = tmp_path / "model"
    for text in ("first", "second"):
        with atomic_directory(destination, keep_existing=True) as staging:
            (staging / "weights").write_text(text)
    assert (destination / "weights").read_text() == "first"
    with atomic_directory(destination) as staging:  # the default replaces
        (staging / "weights").write_text("third")
    assert (destination / "weights").read_text() == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_file_md5_is_the_md5_of_the_bytes(tmp_path):
    path = tmp_path / "blob"
    payload = bytes(range(256)) * 9000  # more than one read chunk
    path.write_bytes(payload)
    assert file_md5(path) == file_md5(str(path)) == hashlib.md5(payload).hexdigest()

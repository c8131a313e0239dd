"""A saved concept's bytes depend only on its content (same tensors, same file, in any process)."""

import hashlib
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conceptflow.adapters.concept_io import ADAPTER_FILE, read_adapter, save_adapter

WRITE = """
import sys, torch
from conceptflow.adapters.concept_io import save_adapter
tensors = {f"unet.layer{i}.weight": torch.full((3, 2), float(i)) for i in range(5)}
save_adapter(sys.argv[1], tensors, {"method": "edlora", "name": "dog", "kind": "concept"})
"""


def test_two_processes_write_the_same_bytes(tmp_path):
    digests = set()
    for index in range(3):  # safetensors' own metadata order differs between processes
        folder = tmp_path / f"run{index}"
        subprocess.run([sys.executable, "-c", WRITE, str(folder)], check=True)
        digests.add(hashlib.md5((folder / ADAPTER_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_saved_tensors_and_metadata_read_back(tmp_path):
    tensors = {"embedding.<dog1_l00>": torch.randn(8), "unet.a.lora_A.weight": torch.randn(4, 8, dtype=torch.float16)}
    save_adapter(tmp_path, tensors, {"method": "edlora", "name": "dög"})
    loaded, meta = read_adapter(tmp_path)
    assert meta["name"] == "dög" and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(tmp_path / ADAPTER_FILE), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "method": "edlora"}
    assert set(load_file(str(tmp_path / ADAPTER_FILE))) == set(tensors)

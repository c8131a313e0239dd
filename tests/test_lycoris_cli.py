"""`conceptflow export-lycoris` refuses what LyCORIS cannot hold, naming the folder."""

from typer.testing import CliRunner

from conceptflow.adapters.concept_io import save_adapter
from conceptflow.cli import app


def test_export_refuses_edlora_concepts(tmp_path):
    import torch

    save_adapter(tmp_path / "dog", {"embedding.<dog1_l00>": torch.zeros(4)}, {"method": "edlora", "name": "dog"})
    result = CliRunner().invoke(app, ["export-lycoris", str(tmp_path / "dog"), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert "only conceptflow_s" in result.output and str(tmp_path / "dog") in result.output
    assert not (tmp_path / "out.safetensors").exists()

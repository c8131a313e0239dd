"""`conceptflow export-lycoris` refuses what LyCORIS LoKr cannot hold for the UIs, naming the folder."""

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


def test_export_refuses_row_norm_concepts_naming_the_exact_formats(tmp_path):
    """Row-norm KronA-WED (concept.json without weight_decompose, as before the setting) is not what
    ComfyUI/A1111 compute from LoKr: the command says which formats are exact instead."""
    import torch

    tensors = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.kron_a": torch.zeros(2, 2),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.kron_b": torch.zeros(16, 16),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.magnitude": torch.ones(32)}
    save_adapter(tmp_path / "heart", tensors, {"method": "conceptflow_s", "name": "heart"})
    result = CliRunner().invoke(app, ["export-lycoris", str(tmp_path / "heart"), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert "'diff'" in result.output and "weight_decompose: rows" in result.output
    assert not (tmp_path / "out.safetensors").exists()

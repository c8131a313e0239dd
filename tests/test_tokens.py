"""Layer-wise concept tokens: one batched text-encoder call, substitution, gradients."""

import pytest
import torch

from conceptflow.adapters.tokens import (
    ConceptEmbeddings,
    add_concept_tokens,
    class_word_prompt,
    encode_layerwise,
    expand_prompt,
    token_positions,
)
from conceptflow.errors import ConceptflowError


def test_expand_and_class_word_prompts():
    assert expand_prompt("a <dog> on grass", 3, ["dog"]) == "a <dog1_l03> <dog2_l03> on grass"
    assert class_word_prompt("a <dog> and a <cat>", {"dog": "dog", "cat": "cat"}) == "a dog and a cat"
    with pytest.raises(ConceptflowError, match="<cow>"):
        expand_prompt("a <cow>", 0, ["dog"])


def test_one_batched_call_gives_each_layer_its_tokens(tiny_pipeline):
    tokenizer, text_encoder = tiny_pipeline.tokenizer, tiny_pipeline.text_encoder
    n_layers = 7
    ids = add_concept_tokens(tokenizer, text_encoder, "dog", n_layers)
    assert len(ids) == 2 * n_layers and len(set(ids)) == 2 * n_layers
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = torch.randn(len(ids), 32)
    calls = []
    handle = text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    with torch.no_grad():
        encoded = encode_layerwise(["a photo of a <dog>", "a <dog> on grass"], tokenizer, text_encoder, n_layers, ["dog"])
    handle.remove()
    assert calls == [torch.Size([2 * n_layers, 77])]
    assert encoded.shape == (2, n_layers, 77, 32)
    with torch.no_grad():
        layer2 = text_encoder(tokenizer([expand_prompt("a <dog> on grass", 2, ["dog"])], padding="max_length",
                                        max_length=77, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(encoded[1, 2], layer2[0])
    assert not torch.allclose(encoded[0, 0], encoded[0, 1])
    assert token_positions("a photo of a <dog>", tokenizer, "dog", 0) == [5, 6]
    add_concept_tokens(tokenizer, text_encoder, "cat", n_layers)
    assert token_positions("a <cat> and a <dog>", tokenizer, "dog", 2) == [6, 7]


def test_concept_embeddings_train_only_new_rows(tiny_pipeline):
    tokenizer, text_encoder = tiny_pipeline.tokenizer, tiny_pipeline.text_encoder
    ids = add_concept_tokens(tokenizer, text_encoder, "cat", 1)
    text_encoder.requires_grad_(False)
    embeddings = ConceptEmbeddings(ids, torch.randn(2, 32)).attach(text_encoder)
    encoded = encode_layerwise(["a <cat>"], tokenizer, text_encoder, 1, ["cat"])
    encoded.sum().backward()
    assert embeddings.weight.grad is not None and embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_encoder.parameters())
    # the substituted rows are the parameter's, not the table's
    table_row = text_encoder.get_input_embeddings().weight[ids[0]]
    looked_up = text_encoder.get_input_embeddings()(torch.tensor([[ids[0]]]))[0, 0]
    torch.testing.assert_close(looked_up, embeddings.weight[0].detach())
    assert not torch.allclose(table_row, looked_up)

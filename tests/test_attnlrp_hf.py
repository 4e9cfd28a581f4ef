"""AttnLRP with a padding mask against ``lxt``'s patched Hugging Face BERT (issue 14, item 3).

``lxt`` 2.1 explains Hugging Face models by replacing their modelling module
(``transformers.models.bert.modeling_bert``) with its own copy, whose attention divides the
gradient at q, k (SDPA) and at the output of the attention by 2, whose GELU is its identity
rule and whose LayerNorm holds σ (``lxt.efficient.monkey_patch`` with lxt's ``bert.attnLRP``
map, what lxt documents); the relevance is then ``input ⊙ gradient``. Here a small BERT
encoder built from a config with random weights (no download), in float64, with an
``attention_mask`` that pads tokens (the 4-D additive mask Hugging Face builds: the smallest
float at padded keys), then a Linear head on the first token, is explained twice:

- by lxt's patched classes (a model built after patching, with the same weights; the
  patches are undone right after, they replace classes process-wide);
- by patternnet's ``AttnLRP`` preset on the unpatched model (``F.scaled_dot_product_attention``
  decomposed; the mask a fixed summand of the scores).

They agree to 1e-9 (BERT's SDPA attention, the default of transformers 4.52). BERT's
``attn_implementation="eager"`` (the attention written out with ``torch.matmul`` and
``softmax``; lxt patches it with the same factors and gives the same relevance as its SDPA
path to 1e-16) is not compared: patternnet's decomposition recognises
``nn.MultiheadAttention``, ``F.scaled_dot_product_attention`` and torchvision's window
attention, not a softmax between two free matrix products, so AttnLRP's softmax rule is not
applied there and the relevance differs (measured: 1.1e-3 of a largest relevance of 0.31).
The comparison is on the encoder (the embeddings are computed outside:
``nn.Embedding`` maps token ids, which carry no relevance; lxt explains ``inputs_embeds``
too) and without BERT's pooler (a tanh, which lxt passes with its identity rule and
patternnet's AttnLRP with the gradient).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from patternnet.methods.lrp import AttnLRP

lxt_efficient = pytest.importorskip("lxt.efficient")
transformers = pytest.importorskip("transformers")
lxt_bert = pytest.importorskip("lxt.efficient.models.bert")
lxt_rules = pytest.importorskip("lxt.efficient.rules")
modeling_bert = pytest.importorskip("transformers.models.bert.modeling_bert")
mask_utils = pytest.importorskip("transformers.modeling_attn_mask_utils")

N, L, HIDDEN, HEADS, LAYERS = 2, 7, 16, 4, 2


@contextmanager
def lxt_patched_bert() -> Iterator[Any]:
    """lxt's documented patch of BERT (``monkey_patch(modeling_bert, bert.attnLRP)``), with its
    identity rule exact (lxt adds ``1e-10`` to the activation's input), undone on exit.

    Yields the patched ``modeling_bert`` module (its classes are lxt's while patched)."""
    saved = dict(vars(modeling_bert))
    forwards = {cls: cls.__dict__["forward"] for cls in (nn.LayerNorm, nn.Dropout)}
    fn = lxt_rules.identity_rule_implicit_fn.forward
    defaults = fn.__defaults__
    try:
        fn.__defaults__ = (0.0,)
        lxt_efficient.monkey_patch(modeling_bert, lxt_bert.attnLRP)
        yield modeling_bert
    finally:
        fn.__defaults__ = defaults
        for cls, forward in forwards.items():
            cls.forward = forward
        for name in set(vars(modeling_bert)) - set(saved):
            delattr(modeling_bert, name)
        for name, value in saved.items():
            setattr(modeling_bert, name, value)


class EncoderHead(nn.Module):
    """BERT's encoder with a fixed attention mask, then a Linear head on the first token."""

    def __init__(self, encoder: nn.Module, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(HIDDEN, 3)
        self.mask = mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.encoder(hidden, attention_mask=self.mask, return_dict=True)
        return self.head(out.last_hidden_state[:, 0])


def config(implementation: str) -> Any:
    return transformers.BertConfig(
        vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=16, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=implementation,
    )  # fmt: skip


def padding_mask(padded: bool) -> torch.Tensor | None:
    """Hugging Face's 4-D additive mask for ``attention_mask`` (0: padded token)."""
    if not padded:
        return None
    attention = torch.ones(N, L, dtype=torch.long)
    attention[0, 4:] = 0
    attention[1, -1] = 0
    return mask_utils._prepare_4d_attention_mask_for_sdpa(attention, torch.float64, L)


def build(module: Any, implementation: str, state: dict | None, mask: torch.Tensor | None,
          seed: int = 0) -> EncoderHead:  # fmt: skip
    torch.manual_seed(seed)
    bert = module.BertModel(config(implementation), add_pooling_layer=False)
    model = EncoderHead(bert.encoder, mask).double().eval()
    if state is None:
        for name, parameter in model.named_parameters():  # BERT's LayerNorms start at 1, 0
            if "LayerNorm" in name:
                with torch.no_grad():
                    parameter.add_(0.2 * torch.randn_like(parameter))
    else:
        model.load_state_dict(state)
    return model


def lxt_relevance(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """lxt's relevance: input × gradient of the target logit through the patched model."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return (x * grad).detach()


@pytest.mark.parametrize("padded", [True, False])
def test_attnlrp_equals_lxt_patched_hugging_face_bert(padded: bool) -> None:
    mask = padding_mask(padded)
    model = build(modeling_bert, "sdpa", None, mask)
    assert type(model.encoder.layer[0].attention.self).__name__ == "BertSdpaSelfAttention"
    torch.manual_seed(1)
    x = torch.randn(N, L, HIDDEN, dtype=torch.float64)
    with lxt_patched_bert() as patched:
        reference_model = build(patched, "sdpa", model.state_dict(), mask)
        assert type(reference_model.encoder).__module__ == lxt_bert.__name__
        with torch.no_grad():  # the patch changes the relevance, not the function
            torch.testing.assert_close(reference_model(x), model(x), rtol=1e-10, atol=1e-12)
        reference = lxt_relevance(reference_model, x, target=1)
    assert nn.LayerNorm.forward.__module__ == "torch.nn.modules.normalization"  # restored
    assert modeling_bert.BertModel.__module__ == modeling_bert.__name__
    ours = AttnLRP(model).attribute(x, target=1)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    # Not vacuous: relevance differs from the gradient × input of the unpatched model, and
    # the padding changes it.
    plain = lxt_relevance(model, x, target=1)
    assert (ours - plain).abs().max() > 1e-3 * ours.abs().max()
    if padded:
        unmasked = AttnLRP(build(modeling_bert, "sdpa", model.state_dict(), None)).attribute(
            x, target=1)
        assert (ours - unmasked).abs().max() > 1e-3 * ours.abs().max()


def test_lxt_patch_is_undone() -> None:
    before = modeling_bert.BertSdpaSelfAttention.forward
    with lxt_patched_bert() as patched:
        assert patched.BertSdpaSelfAttention.forward is not before
    assert modeling_bert.BertSdpaSelfAttention.forward is before
    assert "lxt" not in sys.modules.get(nn.LayerNorm.forward.__module__, sys).__name__

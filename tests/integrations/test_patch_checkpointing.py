"""A patched model under transformers' activation (gradient) checkpointing, as fine-tuning
runs it (`TrainingArguments(gradient_checkpointing=True)`): the recomputed blocks run fastlm's
kernels again and the loss and every gradient equal the eager model's, reentrant or not."""

import copy

import pytest
import torch
from test_patch import build

import fastlm


def _enable(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_checkpointed_patched_model_matches_eager(kind, reentrant, monkeypatch):
    ref = build(kind).train()
    for m in ref.modules():  # the same forward twice: no dropout draws to line up
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fast = copy.deepcopy(ref)
    fast.set_attn_implementation("fastlm")
    fastlm.patch(fast)
    for model in (ref, fast):
        _enable(model, reentrant)

    from fastlm.integrations import _hf_attention

    calls = []
    kernel = _hf_attention.attention
    monkeypatch.setattr(_hf_attention, "attention",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding: no padded position predicts a real token
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (ref, fast):
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                        if p.grad is not None}))
    # two layers, each run in the forward and again in the backward's recompute
    assert len(calls) == 4, calls
    (loss_ref, g_ref), (loss_fast, g_fast) = results
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        scale = g_ref[name].abs().max().item() + 1e-12
        err = (g_fast[name] - g_ref[name]).abs().max().item()
        assert err <= 1e-5 * scale, (name, err, scale)

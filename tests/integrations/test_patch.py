"""fastlm.patch on tiny random models of ten architectures: same logits, loss and gradients
as the eager model (fp32), same greedy generation with the KV cache, undo() restores eager."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fastlm
from fastlm.integrations.patch import PATCH_TABLE

DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "llama": DEC,
    "mistral": dict(DEC, num_key_value_heads=2),
    "qwen2": dict(DEC, num_key_value_heads=2),
    "qwen3": dict(DEC, num_key_value_heads=2, head_dim=16),
    "gemma": dict(DEC, num_key_value_heads=1, head_dim=16),
    "phi3": dict(DEC, pad_token_id=0),
    "gpt_neox": DEC,
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64),
    "bert": DEC,
}
EXPECT = {  # what patch() must swap: (norm modules, mlp modules) for two layers
    "gpt2": (5, 2), "llama": (5, 2), "mistral": (5, 2), "qwen2": (5, 2), "qwen3": (9, 2),
    "gemma": (5, 2), "phi3": (5, 2), "gpt_neox": (5, 2), "opt": (5, 0), "bert": (5, 2),
}


def build(kind):
    conf = AutoConfig.for_model(kind, vocab_size=96, **ARCHS[kind])
    torch.manual_seed(0)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    return cls.from_config(conf, attn_implementation="eager").eval()


def forward_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, attention_mask=mask)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss = hidden[mask.bool()].float().pow(2).mean()
    loss.backward()
    return hidden.detach(), loss.detach(), {n: p.grad.clone() for n, p in
                                            model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_patched_model_matches_eager(kind):
    assert kind in PATCH_TABLE
    model = build(kind)
    ids = torch.randint(1, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    ref = forward_and_grads(model, ids, mask)
    handle = fastlm.patch(model)
    assert fastlm.patch(model) is handle  # idempotent
    norms, mlps = EXPECT[kind]
    assert handle.swapped.get("norms", 0) == norms and handle.swapped.get("mlp", 0) == mlps
    assert handle.swapped.get("attention") == 1 and "loss" in handle.skipped
    got = forward_and_grads(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[0][keep], ref[0][keep], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-3, atol=2e-5, msg=name)
    handle.undo()
    assert model.config._attn_implementation == "eager"
    again = forward_and_grads(model, ids, mask)
    assert torch.equal(again[0], ref[0])  # eager behaviour, bit for bit


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma", "phi3"])
def test_greedy_generation_with_cache_is_unchanged(kind):
    model = build(kind)
    ids = torch.randint(1, 96, (1, 6))
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    handle = fastlm.patch(model)
    got = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    handle.undo()
    assert torch.equal(got, ref)


def test_patch_is_per_instance():
    a, b = build("llama"), build("llama")
    fastlm.patch(a)
    assert "forward" in a.model.norm.__dict__ and "forward" not in b.model.norm.__dict__
    assert b.config._attn_implementation == "eager"


def test_selective_patch_and_verbose_report(caplog):
    model = build("llama")
    with caplog.at_level("WARNING", logger="fastlm"):
        h = fastlm.patch(model, attention=False, mlp=False, verbose=True)
    assert set(h.swapped) == {"norms"}
    assert "left alone" in caplog.text and "rope" in caplog.text


def test_mini_convergence_same_losses_with_and_without_patch():
    """30 AdamW steps of a tiny Llama: the patched model's losses follow the eager ones."""
    def run(patched):
        model = build("llama").train()
        if patched:
            fastlm.patch(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(30):
            start = torch.randint(1, 96, (4, 1), generator=g)
            ids = (start + torch.arange(16)) % 95 + 1  # counting: learnable in 30 steps
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    eager, fused = run(False), run(True)
    assert fused[-1] < fused[0] - 0.5
    for a, b in zip(fused, eager):
        assert abs(a - b) <= 2e-3 * abs(b), (fused, eager)


def test_hf_trainer_step_with_patch(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build("gpt2").train()
    fastlm.patch(model)
    rows = [{"input_ids": torch.randint(1, 96, (12,)), "labels": torch.randint(1, 96, (12,))}
            for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=rows).train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))

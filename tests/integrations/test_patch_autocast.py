"""fastlm.patch under mixed precision with fp32 weights (torch.autocast; what the HF Trainer's
bf16=True runs): a patched model's training step follows the unpatched one's under the same
autocast. Before, every patched model failed there (the fused loss inside the custom op was
recast by autocast; attention got q/k in fp32 and v in bf16)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

import fastlm

DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
ARCHS = {
    "llama": DEC,
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
    "qwen3": dict(DEC, head_dim=16),  # q/k norms on bf16 projections
    "gemma": dict(DEC, head_dim=16),
    "phi3": dict(DEC, pad_token_id=0),
    "gpt_neox": DEC,
    "bert": dict(DEC, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def build(kind):
    torch.manual_seed(0)
    conf = AutoConfig.for_model(kind, vocab_size=96, **ARCHS[kind])
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    return auto.from_config(conf, attn_implementation="sdpa").train()


def step(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_patched_training_step_under_autocast_follows_the_unpatched_one(kind):
    ids = torch.randint(1, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = step(build(kind), ids)
    model = build(kind)
    handle = fastlm.patch(model)
    assert "loss" in handle.swapped
    loss, grads = step(model, ids)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=0)
    assert grads.keys() == ref_grads.keys()
    # both ran their products in bf16, rounded differently; a gradient that is ~0 in exact
    # arithmetic (BERT's key bias: softmax ignores a shift shared by all keys) is judged
    # against a tenth of the typical gradient's size instead of its own
    typical = torch.stack([g.norm() for g in ref_grads.values()]).mean()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        ref = ref_grads[name]
        err = (g - ref).norm() / torch.maximum(ref.norm(), 0.1 * typical)
        assert err < 3e-2, (name, float(err))


def test_hf_trainer_bf16_mixed_precision_step_with_patch(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build("llama")
    fastlm.patch(model)
    rows = [{"input_ids": torch.randint(1, 96, (12,)), "labels": torch.randint(1, 96, (12,))}
            for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=2, use_cpu=True, bf16=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=rows).train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert next(model.parameters()).dtype == torch.float32  # fp32 weights, autocast compute

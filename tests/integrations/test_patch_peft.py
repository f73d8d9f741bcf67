"""fastlm.patch with PEFT LoRA adapters, patched before or after get_peft_model: the LoRA
training step equals the unpatched one's (loss and adapter gradients, fp32), with the fused
loss on. Before, patching the PeftModel wrapper put the fused loss on the wrapper while the
base model computed the loss: it failed with a batch-size mismatch."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fastlm

peft = pytest.importorskip("peft")

DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
ARCHS = {  # LoRA on attention and MLP projections, including the ones the fused MLP calls
    "llama": (DEC, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0), ["c_attn", "c_fc"]),
    "phi3": (dict(DEC, pad_token_id=0), ["qkv_proj", "gate_up_proj"]),
}
IDS = torch.randint(1, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def base(kind):
    torch.manual_seed(0)
    conf = AutoConfig.for_model(kind, vocab_size=96, **ARCHS[kind][0])
    return AutoModelForCausalLM.from_config(conf, attn_implementation="eager")


def with_lora(model, kind):
    torch.manual_seed(1)  # init_lora_weights=False: non-zero B, so the adapters matter
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ARCHS[kind][1], lora_dropout=0.0,
                           init_lora_weights=False)
    return peft.get_peft_model(model, conf)


def step(model):
    model.train()
    model.zero_grad()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch"])
@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_lora_step_equals_the_unpatched_one(kind, order):
    ref_out, ref_grads = step(with_lora(base(kind), kind))
    if order == "patch_then_lora":
        model = base(kind)
        handle = fastlm.patch(model)
        model = with_lora(model, kind)
    else:
        model = with_lora(base(kind), kind)
        handle = fastlm.patch(model)
    assert {"loss", "mlp", "norms"} <= set(handle.swapped)
    out, grads = step(model)
    assert out.logits is None  # the fused loss ran
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and all("lora" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_patching_the_wrapper_patches_the_base_once_and_undo_restores_it():
    model = with_lora(base("llama"), "llama")
    handle = fastlm.patch(model)
    inner = model.get_base_model()
    assert fastlm.patch(inner) is handle  # idempotent through either object
    handle.undo()
    assert "_loss_function" not in inner.__dict__ and "forward" not in inner.__dict__
    out, _ = step(model)
    assert out.logits is not None

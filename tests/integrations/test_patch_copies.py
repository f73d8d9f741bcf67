"""fastlm.patch on models that are copied or changed after the patch: a deepcopy (TRL's
reference model, an EMA copy) runs on its own modules, and a head rebuilt by
resize_token_embeddings keeps the fused loss."""

import copy
import pickle

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fastlm

CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),  # untied head
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),  # head tied to the embedding
}


def build(kind):
    torch.manual_seed(0)
    conf = AutoConfig.for_model(kind, vocab_size=96, **CONFIGS[kind])
    return AutoModelForCausalLM.from_config(conf, attn_implementation="eager").train()


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def step(model, ids=IDS):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_step(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_deepcopy_of_a_patched_model_runs_on_its_own_modules(kind):
    """The fused loss's pieces read the model they are called on. Before, they held the
    original's head, and the copy's training step failed with a shape error."""
    ref = step(build(kind))
    model = build(kind)
    handle = fastlm.patch(model)
    twin = copy.deepcopy(model)
    out = step(twin)
    assert out[0].logits is None  # the fused loss ran (no logits materialised)
    assert_same_step(out, ref)
    handle.undo()  # the original's undo leaves the copy patched ...
    assert step(twin)[0].logits is None
    assert step(model)[0].logits is not None
    twin.__dict__["_fastlm_patch"].undo()  # ... and the copy's undoes the copy
    out = step(twin)
    assert out[0].logits is not None and "_loss_function" not in twin.__dict__
    assert_same_step(out, ref)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_resized_embeddings_keep_the_fused_loss(kind, caplog):
    """resize_token_embeddings builds a new Linear for an untied head (Llama's); it gets the
    fused forward on first use (before, the step failed with a shape error), the loss equals
    the unpatched model's, and undo() takes the new head's forward away too."""
    plain = build(kind)
    plain.resize_token_embeddings(100)
    ids = IDS.clone()
    ids[0, 3] = 99  # a new token
    ref = step(plain, ids)
    model = build(kind)
    handle = fastlm.patch(model)
    model.resize_token_embeddings(100)
    with caplog.at_level("INFO", logger="fastlm"):
        out = step(model, ids)
    assert out[0].logits is None
    assert_same_step(out, ref)
    head = model.get_output_embeddings()
    assert "forward" in head.__dict__
    handle.undo()
    assert "forward" not in head.__dict__
    assert_same_step(step(model, ids), ref)


def test_a_patched_model_pickles_after_undo():
    """Pickling the module object itself (torch.save(model)) needs the instance functions
    gone: undo() leaves nothing of fastlm's behind."""
    model = build("llama")
    fastlm.patch(model).undo()
    clone = pickle.loads(pickle.dumps(model))
    assert_same_step(step(clone), step(build("llama")))


def test_patching_one_model_leaves_others_of_its_class_picklable():
    """With the `kernels` package (a transformers dependency) apply_rotary_pos_emb is a module
    object that pickles by its name in the modeling file. The fused-RoPE dispatcher put a
    function in that name, and pickling any Llama failed afterwards, patched or not; now the
    object stays and only its forward dispatches."""
    import transformers.models.llama.modeling_llama as modeling

    before = type(modeling.apply_rotary_pos_emb)
    other = build("llama")
    fastlm.patch(build("llama"))
    assert type(modeling.apply_rotary_pos_emb) is before
    clone = pickle.loads(pickle.dumps(other))
    assert_same_step(step(clone), step(build("llama")))

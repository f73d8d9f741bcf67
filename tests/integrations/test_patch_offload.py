"""fastlm.patch on a model whose weights accelerate offloads (``device_map`` with "disk" or
"cpu" offload, ``dispatch_model``): accelerate's hook wraps each offloaded module's forward to
bring its weights in; the patch puts the fused forward under that hook instead of over it
(it dropped the hook, and the fused norm met its weight on the meta device)."""

import pytest
import torch

import fastlm

accelerate = pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    conf = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    AutoModelForCausalLM.from_config(conf).save_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ref(ids).logits
    tokens = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return path, ids, logits, tokens


def _check(model, ids, logits, tokens):
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
                       tokens)


def _offloaded_norm(model):
    norm = model.model.layers[1].input_layernorm
    assert norm.weight.device.type == "meta" and "_hf_hook" in norm.__dict__
    return norm


def test_patch_under_accelerate_offload(saved, tmp_path):
    path, ids, logits, tokens = saved
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="fastlm", device_map=DEVICE_MAP,
        offload_folder=str(tmp_path / "offload")).eval()
    norm = _offloaded_norm(model)
    wrapper = norm.__dict__["forward"]
    handle = fastlm.patch(model)
    assert {"norms", "mlp", "rope"} <= set(handle.swapped)
    assert norm.__dict__["forward"] is wrapper  # the hook stays outermost
    _check(model, ids, logits, tokens)
    handle.undo()
    assert norm.__dict__["forward"] is wrapper and "_fastlm_patched" not in norm.__dict__
    assert norm._old_forward.__func__ is type(norm).forward
    _check(model, ids, logits, tokens)


def test_patch_then_dispatch(saved, tmp_path):
    """Patched first, offloaded after: the hook wraps the fused forward; undo() gives the
    hook the class's forward back and keeps it."""
    path, ids, logits, tokens = saved
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastlm").eval()
    handle = fastlm.patch(model)
    model = accelerate.dispatch_model(model, device_map=DEVICE_MAP,
                                      offload_dir=str(tmp_path / "offload"))
    norm = _offloaded_norm(model)
    _check(model, ids, logits, tokens)
    handle.undo()
    assert "_hf_hook" in norm.__dict__ and norm._old_forward.__func__ is type(norm).forward
    _check(model, ids, logits, tokens)

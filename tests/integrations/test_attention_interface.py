"""attn_implementation="fastlm": same logits and gradients as eager, with padding and cache."""

import pytest
import torch

import fastlm  # noqa: F401  (registers the attention implementation lazily)
from fastlm.integrations import transformers as hf

hf.register()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    # sliding windows shorter than the sequence, Gemma 2's attention soft-capping
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                   query_pre_attn_scalar=16, pad_token_id=0, attn_logit_softcapping=0.5),
    "starcoder2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
}


def model(kind):
    conf = AutoConfig.for_model(kind, vocab_size=128, **CONFIGS[kind])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_grads_match_eager(kind, side):
    m = model(kind)
    ids = torch.randint(0, 128, (2, 13))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :4] = 0
    else:
        mask[0, -4:] = 0
    out = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        m.zero_grad()
        logits = m(ids, attention_mask=mask).logits
        (logits[mask.bool()].square().mean()).backward()
        out[impl] = (logits.detach(), [p.grad.clone() for p in m.parameters()])
        assert m.config._attn_implementation == impl
    keep = mask.bool()
    torch.testing.assert_close(out["fastlm"][0][keep], out["eager"][0][keep], rtol=1e-4,
                               atol=1e-5)
    for a, b in zip(out["fastlm"][1], out["eager"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_greedy_generation_with_cache_matches_eager(kind):
    m = model(kind)
    ids = torch.randint(0, 128, (1, 7))
    runs = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        runs[impl] = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(runs["eager"], runs["fastlm"])


def test_from_config_accepts_fastlm():
    conf = AutoConfig.for_model("gpt2", vocab_size=64, **CONFIGS["gpt2"])
    m = AutoModelForCausalLM.from_config(conf, attn_implementation="fastlm")
    assert m.config._attn_implementation == "fastlm"


OWN_ATTENTION = {  # models with their own attention code, outside the attention interface
    "bloom": dict(hidden_size=32, n_layer=2, n_head=2),
    "mpt": dict(d_model=32, n_layers=2, n_heads=2),
    "xglm": dict(d_model=32, num_layers=2, attention_heads=2, ffn_dim=64),
}


@pytest.mark.parametrize("kind", sorted(OWN_ATTENTION))
def test_models_with_their_own_attention_run_as_eager(kind, caplog):
    """transformers lets these take attn_implementation="fastlm" and then read the mask
    themselves: the FastlmMask crashed them (`scores + mask`, `mask.to`, `mask.size`). They get
    the additive mask their eager code takes, the same results as eager, and one warning."""
    import copy
    import logging

    from fastlm.integrations import _hf_mask

    _hf_mask._INTERFACE_USERS.pop(kind, None)
    conf = AutoConfig.for_model(kind, vocab_size=100, **OWN_ATTENTION[kind])
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        fast = AutoModelForCausalLM.from_config(conf, attn_implementation="fastlm").eval()
        eager = copy.deepcopy(fast)
        eager.set_attn_implementation("eager")
        ids = torch.randint(1, 100, (2, 7))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits,
                                   eager(ids, attention_mask=mask).logits)
        runs = [m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           pad_token_id=0) for m in (fast, eager)]
    assert torch.equal(*runs)
    assert caplog.text.count(f"{kind} models run their own attention code") == 1

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


@pytest.mark.parametrize("kind", ["doge", "hy_v4"])
def test_models_that_read_the_mask_themselves(kind):
    """Doge (dynamic mask) and HunYuan v4 (sparse indexer) read the mask in their attention
    modules before the attention function (`mask.dtype`, `mask[...]`, `torch.where(mask, ..)`,
    `mask & m`): read as a tensor, FastlmMask is the dense bool mask sdpa would give them (they
    crashed on it), and the results are eager's."""
    import copy

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind}")
    keys = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, num_hidden_layers=2, head_dim=16, vocab_size=128,
                max_position_embeddings=128, moe_intermediate_size=32, num_experts=4,
                num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
    base = AutoConfig.for_model(kind)
    conf = AutoConfig.for_model(kind, **{k: v for k, v in keys.items() if hasattr(base, k)})
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()
    fast = copy.deepcopy(eager)
    fast.set_attn_implementation("fastlm")
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    keep = mask.bool()
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits[keep],
                               eager(input_ids=ids, attention_mask=mask).logits[keep])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_the_kernel_path_never_builds_the_dense_mask(kind, monkeypatch):
    """The mask reads as a tensor only for models that read it; on the kernels' own path
    (forward, a training step, cached generation) the (B, 1, Sq, Sk) mask is never built."""
    from fastlm.integrations._hf_mask import FastlmMask

    built = []
    real = FastlmMask.dense
    monkeypatch.setattr(FastlmMask, "dense", lambda self: built.append(1) or real(self))
    m = model(kind)
    m.set_attn_implementation("fastlm")
    for mod in m.modules():  # GPT-2's attention dropout would take the sdpa fallback
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    m.train()
    m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    m.eval()
    m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert built == []


SEQ2SEQ = {
    "bart": {},
    "marian": {},
    # its encoder adds the mask to its scores in its own code (short inputs leave block-sparse
    # attention for full): the mask must read as additive there, a bool mask adds 1s silently
    "bigbird_pegasus": dict(attention_type="block_sparse"),
}


@pytest.mark.parametrize("kind", sorted(SEQ2SEQ))
def test_encoder_decoder_models_match_eager(kind):
    """Encoder-decoder models with attn_implementation="fastlm": bidirectional encoder with
    padding, causal decoder, cross-attention (Sq != Sk, the encoder's padding): logits, the
    training loss and gradients, and cached greedy generation equal eager's."""
    import copy

    from transformers import AutoModelForSeq2SeqLM

    conf = AutoConfig.for_model(
        kind, vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, decoder_start_token_id=2, pad_token_id=0, **SEQ2SEQ[kind])
    torch.manual_seed(0)
    eager = AutoModelForSeq2SeqLM.from_config(conf, attn_implementation="eager")
    fast = copy.deepcopy(eager)
    fast.set_attn_implementation("fastlm")
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = torch.randint(3, 100, (2, 5))
    results = []
    for m in (eager, fast):
        m.train()
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        m.eval()
        tokens = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            num_beams=1)
        results.append((out.logits.detach(), out.loss.detach(), tokens,
                        {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (la, sa, ta, ga), (lb, sb, tb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-6)
    assert torch.equal(ta, tb)
    scale = max(g.abs().max().item() for g in ga.values())
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5 * scale, msg=name)

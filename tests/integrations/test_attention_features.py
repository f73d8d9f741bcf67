"""attn_implementation="fastlm" on the paths around plain forwards: sequences packed by position
ids, torch.compile, generate() with a static cache, GPT-OSS's attention sinks, and the features the kernels do not take
(attention weights, dropout, custom 4D masks), which must fall back with one warning naming
the feature and give what transformers' own path gives.
"""

import pytest
import torch

import fastlm  # noqa: F401
from fastlm.integrations import _hf_attention
from fastlm.integrations import transformers as hf

hf.register()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "llama": SMALL,
    # sliding windows shorter than the packed sequences, attention soft-capping
    "gemma2": dict(SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                   pad_token_id=0, attn_logit_softcapping=0.5),
    "mistral": dict(SMALL, sliding_window=3),
}
# more for packing: sliding and full layers mixed (Gemma 3, Qwen2's max_window_layers),
# partial rotary (GPT-NeoX), interleaved rotary (Cohere)
PACKED_MORE = {
    "gemma3_text": dict(SMALL, head_dim=16, sliding_window=3, pad_token_id=0),
    "qwen2": dict(SMALL, sliding_window=3, use_sliding_window=True, max_window_layers=1),
    "gpt_neox": SMALL,
    "cohere": dict(SMALL, pad_token_id=0),
}
# three sequences in row 0 (lengths 5, 1, 7) and two in row 1 (9, 4), positions restarting
POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6],
                          [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]])


def model(kind, **overrides):
    base = CONFIGS[kind] if kind in CONFIGS else PACKED_MORE[kind]
    conf = AutoConfig.for_model(kind, vocab_size=128, **{**base, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf, attn_implementation="eager")


@pytest.fixture
def warnings_seen(monkeypatch):
    """The fallback reasons warned about during the test (each is warned once a process)."""
    seen = set()
    monkeypatch.setattr(_hf_attention, "_warned", seen)
    return seen


def _step(m, impl, **inputs):
    m.set_attn_implementation(impl)
    m.zero_grad()
    logits = m(**inputs, use_cache=False).logits
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in m.parameters()]


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=tol)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("kind", sorted(CONFIGS) + sorted(PACKED_MORE))
def test_packed_sequences_run_in_the_kernel_and_match_eager(kind, warnings_seen, kernel_calls):
    """transformers finds sequences packed into a row from position ids that restart (what
    DataCollatorWithFlattening and fastlm's document boundaries produce) and builds a
    block-diagonal mask; fastlm hands the kernel the sequence ids instead of a dense mask."""
    m = model(kind).train()  # training: no cache, so transformers looks for packing
    ids = torch.randint(1, 128, POSITIONS.shape)
    eager = _step(m, "eager", input_ids=ids, position_ids=POSITIONS)
    fused = _step(m, "fastlm", input_ids=ids, position_ids=POSITIONS)
    _assert_same(fused, eager)
    assert warnings_seen == set()
    assert kernel_calls and all(c["segment_ids"] is not None for c in kernel_calls)
    # the same tokens unpacked (positions 0..12 in each row) give other logits: packing counted
    unpacked = _step(m, "fastlm", input_ids=ids)
    assert not torch.allclose(unpacked[0], fused[0], atol=1e-3)


@pytest.mark.parametrize("with_mask", [True, False], ids=["attention_mask", "no_mask"])
def test_compiled_training_forward(with_mask, warnings_seen, kernel_calls):
    """fullgraph torch.compile of a training forward + backward. Given an attention mask,
    transformers builds a plain causal mask function and the kernel runs; without one, it
    adds its packed-sequence check as closures dynamo cannot read, and the call falls back to
    sdpa with one warning (reading them raised inside the trace, and the whole forward ran
    eagerly, before)."""
    m = model("llama").train()
    ids = torch.randint(1, 128, (2, 13))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids)) if with_mask else \
        dict(input_ids=ids)
    eager = _step(m, "eager", **inputs)
    m.set_attn_implementation("fastlm")
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    m.zero_grad()
    logits = compiled(**inputs, use_cache=False).logits
    logits.square().mean().backward()
    _assert_same((logits.detach(), [p.grad for p in m.parameters()]), eager)
    if with_mask:
        assert warnings_seen == set() and kernel_calls
    else:
        assert len(warnings_seen) == 1 and "torch.compile" in next(iter(warnings_seen))
        assert not kernel_calls


@pytest.mark.parametrize("kind, packed", [("llama", True), ("mistral", False),
                                          ("mistral", True), ("gemma2", True)])
def test_compiled_training_reads_closure_masks_outside_the_graph(kind, packed, warnings_seen,
                                                                 kernel_calls):
    """torch.compile (graphs may break, the default) of a training forward + backward whose
    mask transformers builds from closures dynamo cannot read (sliding windows; packed
    sequences): the closures are read outside the graph and the kernel runs with the windows
    and sequence ids, where every such call fell back to sdpa. Same logits and gradients as
    eager. With fullgraph=True the dense fallback stays (the test above)."""
    m = model(kind).train()
    ids = torch.randint(1, 128, POSITIONS.shape)
    inputs = dict(input_ids=ids, position_ids=POSITIONS) if packed else dict(input_ids=ids)
    eager = _step(m, "eager", **inputs)
    m.set_attn_implementation("fastlm")
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    m.zero_grad()
    logits = compiled(**inputs, use_cache=False).logits
    logits.square().mean().backward()
    _assert_same((logits.detach(), [p.grad for p in m.parameters()]), eager)
    assert warnings_seen == set() and kernel_calls
    if packed:
        assert all(c["segment_ids"] is not None for c in kernel_calls)
    if kind != "llama":
        assert any(c["window"] not in (None, (-1, 0)) for c in kernel_calls)


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_non_strict_export_keeps_the_kernel_in_the_graph(kind, warnings_seen, kernel_calls):
    """torch.export (non-strict, its default) of a padded forward with a dynamic length: the
    forward runs as Python on traced tensors, so the mask's closures (the sliding window) are
    read in place and the fused op is in the exported graph, which matches eager at another
    length. Judged as dynamo's trace before, every such call fell back to sdpa."""
    m = model(kind).eval()
    m.set_attn_implementation("fastlm")
    ids = torch.randint(1, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    length = torch.export.Dim("length", min=2, max=64)
    ep = torch.export.export(_Logits(m), (ids, mask), dynamic_shapes=({1: length}, {1: length}))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "fastlm.attention_fwd.default" in ops
    assert warnings_seen == set() and kernel_calls
    if kind == "mistral":
        assert all(c["window"] not in (None, (-1, 0)) for c in kernel_calls)
    ids, mask = torch.randint(1, 128, (2, 17)), torch.ones(2, 17, dtype=torch.long)
    mask[0, :5] = 0
    m.set_attn_implementation("eager")
    with torch.no_grad():
        eager = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
        exported = ep.module()(ids, mask)
    kept = mask.bool()  # rows of padded queries are not compared (eager gives them noise)
    torch.testing.assert_close(exported[kept], eager[kept], rtol=1e-4, atol=1e-5)


MLA = {  # multi-head latent attention: value heads narrower, then wider than query/key heads
    "deepseek_v3": dict(SMALL, num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, kv_lora_rank=16, q_lora_rank=32, n_routed_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1),
    "minicpm3": dict(SMALL, num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                     v_head_dim=32, kv_lora_rank=16, q_lora_rank=32),
}


@pytest.mark.parametrize("kind", sorted(MLA))
def test_latent_attention_with_other_value_head_dims_runs_in_the_kernel(kind, warnings_seen,
                                                                        kernel_calls):
    """DeepSeek-V3's values are narrower than its queries and keys (MiniCPM3's wider): these
    calls fell back to sdpa. Zero-padded to one head dim they run in the kernel: logits,
    gradients and cached greedy generation equal eager's, packed sequences included."""
    conf = AutoConfig.for_model(kind, vocab_size=128, **MLA[kind])
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").train()
    ids = torch.randint(1, 128, POSITIONS.shape)
    for inputs in (dict(input_ids=ids), dict(input_ids=ids, position_ids=POSITIONS)):
        _assert_same(_step(m, "fastlm", **inputs), _step(m, "eager", **inputs))
    m.eval()
    runs = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        runs[impl] = m.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(runs["eager"], runs["fastlm"])
    assert warnings_seen == set() and kernel_calls


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "mistral"])
def test_static_cache_generation_matches_eager(kind, warnings_seen, kernel_calls):
    """generate() with a static cache builds each step's mask up front and passes it back in
    as the attention mask (it crashed transformers' mask code before FastlmMask.ndim)."""
    m = model(kind).eval()
    ids = torch.randint(1, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    runs = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        runs[impl] = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                pad_token_id=0, cache_implementation="static")
    assert torch.equal(runs["eager"], runs["fastlm"])
    assert warnings_seen == set() and kernel_calls


def test_gpt_oss_attention_sinks_run_in_the_kernel(warnings_seen, kernel_calls):
    """GPT-OSS passes its per-head sinks as ``s_aux``: they go to the kernel (they fell back to
    eager before), with sliding and full layers, left padding (a padded row's weight all goes
    to the sink), training gradients (the sinks' included) and cached greedy generation equal
    to eager's. The sinks are drawn large so they take a real share of each row."""
    conf = AutoConfig.for_model("gpt_oss", vocab_size=128, **SMALL, head_dim=16,
                                num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
                                pad_token_id=0)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(conf, attn_implementation="eager")
    assert conf.layer_types == ["sliding_attention", "full_attention"]
    sinks = [mod.sinks for mod in m.modules() if hasattr(mod, "sinks")]
    with torch.no_grad():
        for s in sinks:
            s.copy_(torch.linspace(-2.0, 3.0, s.numel()))
    ids = torch.randint(1, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    eager = _step(m.train(), "eager", input_ids=ids, attention_mask=mask)
    fused = _step(m, "fastlm", input_ids=ids, attention_mask=mask)
    _assert_same(fused, eager)
    assert warnings_seen == set()
    assert len(kernel_calls) == 2 and all(c["sinks"] is not None for c in kernel_calls)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sinks)
    runs = {}
    m.eval()
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        runs[impl] = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(runs["eager"], runs["fastlm"])
    assert warnings_seen == set()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_output_attentions_falls_back_to_eager_with_one_warning(kind, warnings_seen):
    """GPT-2's forward drops output_attentions before its layers see it (transformers' own sdpa
    then silently returns no weights); fastlm reads what the model is recording instead."""
    m = model(kind).eval()
    ids = torch.randint(1, 128, (2, 9))
    out = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        out[impl] = m(ids, output_attentions=True)
    assert len(out["fastlm"].attentions) == 2
    for a, b in zip(out["fastlm"].attentions, out["eager"].attentions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out["fastlm"].logits, out["eager"].logits)
    assert warnings_seen == {"output_attentions=True"}


def test_attention_dropout_in_training_falls_back_to_sdpa(warnings_seen, kernel_calls):
    """With the same seed the fallback draws the same dropout masks as attn_implementation=
    "sdpa"; in eval mode (no dropout) the kernel runs."""
    m = model("llama", attention_dropout=0.5).train()
    ids = torch.randint(1, 128, (2, 9))
    out = {}
    for impl in ("sdpa", "fastlm"):
        torch.manual_seed(1)
        out[impl] = _step(m, impl, input_ids=ids)
    _assert_same(out["fastlm"], out["sdpa"])
    assert warnings_seen == {"attention dropout (p > 0, training)"} and not kernel_calls
    m.eval()
    m(ids)
    assert kernel_calls


def test_a_custom_4d_mask_falls_back_to_sdpa(warnings_seen):
    m = model("llama").eval()
    ids = torch.randint(1, 128, (2, 9))
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()
    allowed[4:, :2] = False  # later queries may not see the first two keys
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        out[impl] = m(ids, attention_mask=additive).logits
    torch.testing.assert_close(out["fastlm"], out["eager"], rtol=1e-4, atol=1e-5)
    assert len(warnings_seen) == 1 and "4D mask" in next(iter(warnings_seen))


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "with_cu_seq_lens"])
def test_data_collator_with_flattening(flash_kwargs, warnings_seen, kernel_calls):
    """transformers' own packing collator, as an SFT script uses it: one row of several
    examples, labels -100 at each start; the loss and gradients equal eager's. With
    return_flash_attn_kwargs the batch also carries cu_seq_lens_* for flash-attention, which
    the model passes through to the attention function (the ids already say the same)."""
    from transformers import DataCollatorWithFlattening

    examples = [{"input_ids": torch.randint(1, 128, (n,)).tolist()} for n in (7, 1, 12, 5)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(examples)
    assert batch["input_ids"].shape == (1, 25) and (batch["position_ids"] == 0).sum() == 4
    m = model("llama").train()
    out = {}
    for impl in ("eager", "fastlm"):
        m.set_attn_implementation(impl)
        m.zero_grad()
        loss = m(**batch, use_cache=False).loss
        loss.backward()
        out[impl] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
    _assert_same(out["fastlm"], out["eager"])
    assert warnings_seen == set()
    assert kernel_calls and all(c["segment_ids"] is not None for c in kernel_calls)

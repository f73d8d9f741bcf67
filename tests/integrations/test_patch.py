"""fastlm.patch on tiny random models of twenty-five architectures: same logits, loss and
gradients as the eager model (fp32), the fused training loss equals HF's, same greedy
generation with the KV cache, torch.compile, undo() restores eager. What a model does in a way
the kernels do not (GPT-J's RoPE function, a mixture of experts' stacked weights, scaled logits)
is left alone and reported, never swapped."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fastlm
from fastlm.integrations.patch import PATCH_TABLE

DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
MOE = dict(DEC, num_key_value_heads=2, num_experts_per_tok=2)
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
    # an encoder with rotary embeddings and local (windowed) bidirectional attention
    "modernbert": dict(DEC, pad_token_id=0, global_attn_every_n_layers=2, local_attention=4),
    # the same code serving more: attention soft-capping and sliding windows (Gemma 2, and
    # Starcoder2's window), q/k norms (OLMo 2), partial rotary with a LayerNorm model (Phi,
    # StableLM, Falcon), Granite's multipliers, mixtures of experts
    "gemma2": dict(DEC, num_key_value_heads=2, head_dim=16, sliding_window=4,
                   query_pre_attn_scalar=16, pad_token_id=0, final_logit_softcapping=2.0),
    "gemma3_text": dict(DEC, num_key_value_heads=2, head_dim=16, sliding_window=4,
                        pad_token_id=0, final_logit_softcapping=2.0),
    "starcoder2": dict(DEC, num_key_value_heads=2, sliding_window=4),
    "olmo2": dict(DEC, pad_token_id=0),
    "phi": dict(DEC, partial_rotary_factor=0.5),
    "stablelm": dict(DEC, num_key_value_heads=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "granite": dict(DEC, logits_scaling=2.0, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.3),
    "mixtral": dict(MOE, num_local_experts=4),
    "qwen3_moe": dict(MOE, head_dim=16, num_experts=4, moe_intermediate_size=32),
    # attention sinks (in the kernel), half-width RoPE tables, sliding and full layers
    "gpt_oss": dict(MOE, head_dim=16, num_local_experts=4, sliding_window=4, pad_token_id=0),
    # RoPE the fused kernel does not compute: interleaved pairs (Cohere, GLM), GPT-J's (x, sin,
    # cos) function
    "cohere": dict(DEC, logit_scale=0.5, pad_token_id=0),
    "glm": dict(DEC, pad_token_id=0),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
}
EXPECT = {  # what patch() must swap: (norm modules, mlp modules) for two layers
    "gpt2": (5, 2), "llama": (5, 2), "mistral": (5, 2), "qwen2": (5, 2), "qwen3": (9, 2),
    "gemma": (5, 2), "phi3": (5, 2), "gpt_neox": (5, 0), "opt": (5, 0), "bert": (5, 0),
    "modernbert": (5, 0),
    "gemma2": (9, 2), "gemma3_text": (13, 2), "starcoder2": (5, 0), "olmo2": (9, 2), "phi": (3, 2), "stablelm": (5, 2),
    "falcon": (3, 0), "granite": (5, 2), "mixtral": (5, 0), "qwen3_moe": (9, 0), "gpt_oss": (5, 0),
    "cohere": (3, 2), "glm": (5, 2), "gptj": (3, 2),
}
LEARNED_POSITIONS = {"gpt2", "opt", "bert"}  # no rotary embedding to fuse
ROPE_REFUSED = {"gptj": "it takes (tensor, sin, cos)"}
ROPE_PAIRS = {"cohere", "glm"}  # interleaved pairs: the fused op's interleaved form
# Granite and Cohere scale the head's logits before HF's loss (logits_scaling 2, logit_scale
# 0.5 here), Gemma 2 soft-caps them (a cap of 2): the fused loss must include each
ENCODERS = {"bert", "modernbert"}
LOSS_REFUSED = ENCODERS  # (BERT's masked-LM loss: its own test)
CAUSAL = sorted(set(ARCHS) - ENCODERS)
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "opt": dict(dropout=0.0)}


def build(kind, **overrides):
    conf = AutoConfig.for_model(kind, vocab_size=96, **dict(ARCHS[kind], **overrides))
    torch.manual_seed(0)
    cls = AutoModel if kind in ENCODERS else AutoModelForCausalLM
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
    assert handle.swapped.get("attention") == 1
    no_rope = kind in LEARNED_POSITIONS or kind in ROPE_REFUSED
    assert handle.swapped.get("rope", 0) == (0 if no_rope else 2)
    if kind in ROPE_REFUSED:
        assert ROPE_REFUSED[kind] in handle.skipped["rope"]
    assert ("loss" in handle.swapped) == (kind not in LOSS_REFUSED)
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


@pytest.mark.parametrize("kind", sorted(set(CAUSAL) - LOSS_REFUSED))
@pytest.mark.parametrize("accumulate", [False, True], ids=["mean", "num_items_in_batch"])
def test_fused_training_loss_matches_hf(kind, accumulate):
    """In training with labels the patched model's loss (fused LM head + cross-entropy, no
    logits) and every parameter gradient equal HF's eager loss; ignored labels included."""
    model = build(kind, **NO_DROPOUT.get(kind, {})).train()
    ids = torch.randint(1, 96, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt masked out, as in SFT
    extra = {"num_items_in_batch": torch.tensor(20)} if accumulate else {}

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()
                     if p.grad is not None}

    ref, ref_grads = step()
    handle = fastlm.patch(model)
    out, grads = step()
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=2e-5,
                                   msg=name)
    model.eval()  # outside training: HF's own path, logits and loss
    with torch.no_grad():
        ev = model(input_ids=ids, labels=labels, **extra)
    assert ev.logits is not None
    torch.testing.assert_close(ev.loss, ref.loss, rtol=1e-5, atol=1e-6)
    handle.undo()
    assert "_loss_function" not in model.__dict__
    assert "forward" not in model.__dict__ and "forward" not in \
        model.get_output_embeddings().__dict__


def test_gemma2_fused_loss_leaves_a_shared_config_alone():
    """The fused loss applies Gemma 2's final soft-cap itself, so the patched forward runs
    HF's without it: on a copy of the config for that call, never on the config object,
    which another model may share (here one in eval mode, called from inside the forward)."""
    model = build("gemma2").train()
    other = build("gemma2").eval()
    other.config = model.config  # one config object for both
    ids = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        ref = other(ids).logits
    seen = []
    hook = model.model.register_forward_hook(
        lambda *_: seen.append(torch.equal(other(ids).logits, ref)))
    fastlm.patch(model)
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    hook.remove()
    assert seen == [True] and model.config.final_logit_softcapping == 2.0


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_fused_loss_with_the_router_loss_of_a_mixture_of_experts(kind):
    """With output_router_logits, HF adds the experts' load-balancing loss to the LM loss in
    place (``loss += coef * aux_loss``) after the fused loss returned: same loss and gradients."""
    model = build(kind, output_router_logits=True).train()
    ids = torch.randint(1, 96, (2, 9))

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = step()
    handle = fastlm.patch(model)
    out, grads = step()
    assert out.logits is None and out.aux_loss is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=2e-5, msg=name)
    handle.undo()


@pytest.mark.parametrize("cls_name", ["BertLMHeadModel", "BertForPreTraining"])
def test_bert_heads_whose_loss_is_not_the_masked_lm_one_keep_hf_loss(cls_name):
    """BertLMHeadModel's head is the masked-LM head's, but its loss is causal (shifted) and
    BertForPreTraining adds next-sentence prediction: the fused masked-LM loss gave the first
    an unshifted loss, silently. Both keep HF's loss; the loss and gradients are HF's."""
    import transformers

    conf = AutoConfig.for_model("bert", vocab_size=96, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, is_decoder=True,
                                **ARCHS["bert"])
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(conf).train()
    ids = torch.randint(1, 96, (2, 11))
    kw = dict(labels=ids) if cls_name == "BertLMHeadModel" else dict(
        labels=ids, next_sentence_label=torch.tensor([0, 1]))

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, **kw).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    ref_loss, ref_grads = step()
    handle = fastlm.patch(model)
    assert "loss" not in handle.swapped and cls_name in handle.skipped["loss"]
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=2e-5, msg=name)


@pytest.mark.parametrize("return_dict", [True, False])
def test_fused_masked_lm_loss_matches_hf(return_dict):
    """BERT's masked-LM loss: the patched model runs the vocab-wide decoder on the labelled
    positions only (fused with the cross-entropy); loss and every gradient equal HF's."""
    from transformers import AutoModelForMaskedLM

    conf = AutoConfig.for_model("bert", vocab_size=96, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, **ARCHS["bert"])
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(conf, attn_implementation="eager").train()
    ids = torch.randint(1, 96, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape) < 0.25
    picked[0, 0] = True
    labels[picked] = ids[picked]

    def step():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=return_dict)
        loss = out[0] if not return_dict else out.loss
        loss.backward()
        return out, loss, {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}

    ref, ref_loss, ref_grads = step()
    handle = fastlm.patch(model)
    assert handle.swapped.get("loss") == 1
    spy = []
    decoder = model.cls.predictions.decoder
    hook = decoder.register_forward_hook(lambda m, args, out: spy.append(args[0].shape))
    out, loss, grads = step()
    hook.remove()
    # a pass-through call inside HF's forward (deferred), then the vocab-wide product on the
    # labelled rows only
    assert spy == [(3, 13, 64), (int(picked.sum()), 64)]
    assert (out.logits if return_dict else out[1]) is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=2e-5, msg=name)
    model.eval()  # outside training: HF's own path
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert ev.logits is not None
    torch.testing.assert_close(ev.loss, ref_loss, rtol=1e-5, atol=1e-6)
    handle.undo()
    assert "forward" not in model.__dict__ and "forward" not in decoder.__dict__


@pytest.mark.parametrize("kind", sorted(ROPE_PAIRS))
def test_interleaved_rope_runs_in_the_kernel(kind, monkeypatch):
    """Cohere's and GLM's RoPE (adjacent pairs; GLM's with tables rebuilt from HF's halves, and
    partial) run the fused op's interleaved form; the logits and gradients equal eager's in
    test_patched_model_matches_eager."""
    import fastlm.ops

    calls = []
    real = fastlm.ops.rotary
    monkeypatch.setattr(fastlm.ops, "rotary",
                        lambda *a, **k: calls.append(k.get("interleaved")) or real(*a, **k))
    model = build(kind)
    fastlm.patch(model)
    model(torch.randint(1, 96, (1, 5)))
    assert calls == [True, True]


def test_fused_rope_only_runs_in_patched_instances(monkeypatch):
    import fastlm.ops

    calls = []
    real = fastlm.ops.rotary
    monkeypatch.setattr(fastlm.ops, "rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = build("llama"), build("llama")
    fastlm.patch(a)
    ids = torch.randint(1, 96, (1, 5))
    b(ids)
    assert calls == []  # same class, unpatched instance: HF's own rotary
    a(ids)
    assert len(calls) == 2  # one call per layer
    a._fastlm_patch.undo()
    a(ids)
    assert len(calls) == 2


@pytest.mark.slow
def test_torch_compile_of_a_patched_model():
    """forward + backward of a compiled patched model (fused loss, rope, norms, MLP and
    attention custom ops inside the graph) give the eager model's loss and gradients."""
    model = build("llama", num_hidden_layers=1).train()
    ids = torch.randint(1, 96, (2, 11))
    ref = model(ids, labels=ids).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fastlm.patch(model)
    loss = torch.compile(model)(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-3, atol=2e-5, msg=name)


def test_fullgraph_compile_of_patched_and_unpatched_models_of_one_class(monkeypatch):
    """The fused-RoPE dispatcher in modeling_llama is shared by every Llama; it read a
    ContextVar, which dynamo cannot trace, so after one patch no Llama compiled with
    fullgraph=True (patched or not). Both compile now; only the patched one runs the kernel."""
    import fastlm.ops

    calls = []
    real = fastlm.ops.rotary
    monkeypatch.setattr(fastlm.ops, "rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    patched, plain = build("llama").train(), build("llama").train()
    ids = torch.randint(1, 96, (2, 11))
    inputs = dict(attention_mask=torch.ones_like(ids), labels=ids)
    ref = plain(ids, **inputs).loss
    fastlm.patch(patched)
    torch._dynamo.reset()
    loss = torch.compile(plain, backend="aot_eager", fullgraph=True)(ids, **inputs).loss
    assert calls == []
    torch.testing.assert_close(loss, ref)
    loss = torch.compile(patched, backend="aot_eager", fullgraph=True)(ids, **inputs).loss
    assert len(calls) == 2  # one per layer, when traced
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma", "phi3", "gpt_neox", "gemma2",
                                  "starcoder2", "qwen3_moe", "cohere", "gpt_oss"])
def test_greedy_generation_with_cache_is_unchanged(kind):
    model = build(kind)
    ids = torch.randint(1, 96, (1, 6))
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    handle = fastlm.patch(model)
    got = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    handle.undo()
    assert torch.equal(got, ref)


def _spy_on_layer_norm(monkeypatch):
    import fastlm.ops

    calls = []
    real = fastlm.ops.layer_norm
    monkeypatch.setattr(fastlm.ops, "layer_norm",
                        lambda *a, **k: calls.append(a[0].device.type) or real(*a, **k))
    return calls


def test_layer_norm_on_cpu_runs_torch_kernel_and_standalone_gelu_is_left_alone(monkeypatch):
    """Where torch already has one fused kernel, patch() keeps it: LayerNorm on CPU (fastlm's
    CPU kernel only matches aten's there, and the wrapper costs time) and a standalone F.gelu
    activation (GPT-NeoX, BERT; reported as left alone). GPT-2's composite NewGELU is fused."""
    calls = _spy_on_layer_norm(monkeypatch)
    model = build("gpt_neox")
    h = fastlm.patch(model)
    assert h.swapped["norms"] == 5 and "mlp" not in h.swapped
    assert "GELUActivation is one torch kernel already" in h.skipped["mlp"]
    model(torch.randint(1, 96, (1, 7)))
    assert calls == []  # the LayerNorms ran torch's own CPU kernel
    gpt2 = fastlm.patch(build("gpt2"))
    assert gpt2.swapped["mlp"] == 2 and "mlp" not in gpt2.skipped


def test_large_bf16_layer_norm_on_cpu_runs_fastlm_kernel(monkeypatch):
    """From 2^19 bf16 elements fastlm's CPU LayerNorm beats aten's (fused_cpu results), so
    the patched module calls it there, and torch's below; both match torch's LayerNorm."""
    from fastlm.integrations import patch as patch_mod

    calls = _spy_on_layer_norm(monkeypatch)
    model = build("gpt_neox").to(torch.bfloat16)
    fastlm.patch(model)
    ln = model.gpt_neox.final_layer_norm
    hidden = ln.normalized_shape[0]
    for rows, fused in [(8, False), (patch_mod._CPU_LN_MIN_ELEMENTS // hidden, True)]:
        calls.clear()
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, requires_grad=True)
        out = ln(x)
        out.float().square().sum().backward()
        assert calls == (["cpu"] if fused else [])
        want = torch.nn.functional.layer_norm(x.float(), (hidden,), ln.weight.float(),
                                              ln.bias.float(), ln.eps)
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
def test_patched_model_on_gpu_matches_eager(kind, monkeypatch):
    """On CUDA every swapped module runs fastlm's kernels (LayerNorm included) and the model
    keeps the eager model's outputs and gradients (fp32, TF32 off)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    calls = _spy_on_layer_norm(monkeypatch)
    model = build(kind).cuda()
    ids = torch.randint(1, 96, (2, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = forward_and_grads(model, ids, mask)
    fastlm.patch(model)
    got = forward_and_grads(model, ids, mask)
    if kind != "llama":
        assert calls and set(calls) == {"cuda"}
    keep = mask.bool()
    torch.testing.assert_close(got[0][keep], ref[0][keep], rtol=1e-4, atol=2e-5)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-3, atol=2e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_patched_model_on_the_second_gpu_matches_eager(monkeypatch):
    """A model on cuda:1 with cuda:0 current (device_map spreading a model over GPUs): Triton
    launches on the current device, and the fused norms raised "Pointer argument cannot be
    accessed from Triton"; the launchers now run on their tensors' GPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.cuda.set_device(0)
    model = build("llama").to("cuda:1")
    ids = torch.randint(1, 96, (2, 11), device="cuda:1")
    mask = torch.ones_like(ids)
    ref = forward_and_grads(model, ids, mask)
    model.set_attn_implementation("fastlm")
    fastlm.patch(model)
    got = forward_and_grads(model, ids, mask)
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=2e-5)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-3, atol=2e-5, msg=name)


def test_patch_is_per_instance():
    a, b = build("llama"), build("llama")
    fastlm.patch(a)
    assert "forward" in a.model.norm.__dict__ and "forward" not in b.model.norm.__dict__
    assert b.config._attn_implementation == "eager"


def test_selective_patch_and_verbose_report(caplog):
    model = build("gpt2")  # learned positions: the requested rope is reported as left alone
    with caplog.at_level("WARNING", logger="fastlm"):
        h = fastlm.patch(model, attention=False, mlp=False, loss=False, verbose=True)
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


def test_a_model_without_the_attention_interface_is_reported_not_counted():
    """GPT-Neo only logs that it cannot switch attn_implementation: the handle must say the
    attention was left alone, not count it as swapped."""
    conf = AutoConfig.for_model("gpt_neo", vocab_size=96, hidden_size=64, num_layers=2,
                                num_heads=4, attention_types=[[["global", "local"], 1]],
                                window_size=4)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()
    ids = torch.randint(1, 96, (1, 9))
    ref = model(ids).logits
    handle = fastlm.patch(model)
    assert "attention" not in handle.swapped
    assert "does not use transformers' attention interface" in handle.skipped["attention"]
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=2e-5)
    handle.undo()


class _OnePlusRMSNorm(torch.nn.Module):  # scales by 1 + weight, but is not named Gemma...
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n) * 0.1)
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class PlainRMSNorm(_OnePlusRMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class OddRMSNorm(_OnePlusRMSNorm):
    pass


class ChainLayerNorm(_OnePlusRMSNorm):  # a LayerNorm as a chain of ops, no bias (Cohere's)
    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight


class RmsInDisguiseLayerNorm(PlainRMSNorm):  # named LayerNorm, computes RMSNorm
    pass


class _GatedMLP(torch.nn.Module):
    def __init__(self, n, gate_on_up=False):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(n, 2 * n), torch.nn.Linear(n, 2 * n)
        self.down_proj = torch.nn.Linear(2 * n, n)
        self.act_fn = torch.nn.SiLU()
        self.gate_on_up = gate_on_up

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.gate_on_up:  # the activation on the other projection
            g, u = u, g
        return self.down_proj(self.act_fn(g) * u)


def test_a_gated_mlp_with_dropout_is_left_alone():
    """The fused gated forward has no dropout: an MLP that drops out inside (T5Gemma's) keeps
    its own forward, even when patched in eval mode where the probe would agree."""
    mlp = _GatedMLP(16)
    mlp.dropout = torch.nn.Dropout(0.1)
    plain = _GatedMLP(16)
    model = torch.nn.Sequential(mlp, plain).eval()
    handle = fastlm.patch(model)
    assert handle.swapped == {"mlp": 1}
    assert "forward" not in mlp.__dict__ and "forward" in plain.__dict__
    handle.undo()


def test_a_swap_that_disagrees_with_the_module_on_a_probe_is_left_alone():
    """patch() matches modules by name and attributes; each candidate is run once against its
    own forward, so a convention the match cannot see (1 + weight in a norm not named Gemma,
    the gate on the other projection) leaves that module alone, reported, instead of making
    the model silently wrong."""
    model = torch.nn.Sequential(PlainRMSNorm(16), OddRMSNorm(16), _GatedMLP(16),
                                _GatedMLP(16, gate_on_up=True), ChainLayerNorm(16),
                                RmsInDisguiseLayerNorm(16))
    x = torch.randn(2, 5, 16)
    ref = model(x)
    state = torch.random.get_rng_state()
    handle = fastlm.patch(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probes use their own generator
    assert handle.swapped == {"norms": 2, "mlp": 1}
    assert "fused forward differs from its own" in handle.skipped["norms: OddRMSNorm"]
    assert "fused forward differs" in handle.skipped["norms: RmsInDisguiseLayerNorm"]
    assert "fused forward differs from its own" in handle.skipped["mlp: _GatedMLP"]
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    assert "forward" in model[2].__dict__ and "forward" not in model[3].__dict__
    assert "forward" in model[4].__dict__ and "forward" not in model[5].__dict__
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    handle.undo()


class Fp32LayerNorm(torch.nn.Module):  # DeBERTa's: fp32 math whatever the input, then w*x+b
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(n))
        self.variance_epsilon = 1e-7

    def forward(self, x):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt((h - mean).pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype) + self.bias


def test_a_models_fp32_layer_norm_keeps_its_bf16_gradient_accuracy():
    """A model's own LayerNorm computing in fp32 (DeBERTa's) went to torch's bf16 CPU kernel,
    whose weight and bias gradients had 2.5-3x the error of the model's code (against fp32);
    the bf16 sweep caught it. fastlm's kernel (fp32 throughout) runs there instead: within 2x."""
    torch.manual_seed(0)
    norm = Fp32LayerNorm(64)
    x, dy = torch.randn(2048, 64) + 0.5, torch.randn(2048, 64)

    def grads(module, dtype):
        module.zero_grad()
        out = module(x.to(dtype))
        out.backward(dy.to(dtype))
        return out.float(), module.weight.grad.float(), module.bias.grad.float()

    want = grads(norm, torch.float32)
    low = copy.deepcopy(norm).to(torch.bfloat16)
    own = grads(low, torch.bfloat16)
    handle = fastlm.patch(torch.nn.Sequential(low))
    assert handle.swapped == {"norms": 1}
    got = grads(low, torch.bfloat16)
    for g, o, w in zip(got, own, want):
        err, ref_err = ((t - w).abs().max() / w.abs().max() for t in (g, o))
        assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    handle.undo()


def test_the_probe_tells_an_rms_norm_from_a_layer_norm_in_bf16():
    """On zero-mean probe rows a LayerNorm and an RMS norm differ by ~1/sqrt(width), inside
    the 16-bit tolerance: CPMAnt's RMS norm (class CpmAntLayerNorm) got a LayerNorm in bf16
    and its logits were off by 100%. The probe's rows have means away from 0."""
    norm = RmsInDisguiseLayerNorm(1024).to(torch.bfloat16)
    handle = fastlm.patch(torch.nn.Sequential(norm))
    assert handle.swapped == {}
    assert "fused forward differs" in handle.skipped["norms: RmsInDisguiseLayerNorm"]
    plain = torch.nn.Sequential(torch.nn.LayerNorm(1024).to(torch.bfloat16))
    assert fastlm.patch(plain).swapped == {"norms": 1}  # a true LayerNorm still passes


def test_each_kind_of_module_is_probed_once(monkeypatch):
    """Probes run per class, parameter layout and plain attributes: Llama's five RMSNorms and
    two MLPs take two probes (the per-instance flag of the test above takes its own)."""
    from fastlm.integrations import patch as patch_mod

    calls = []
    real = patch_mod._disagrees
    monkeypatch.setattr(patch_mod, "_disagrees",
                        lambda m, f: calls.append(type(m).__name__) or real(m, f))
    handle = fastlm.patch(build("llama"))
    assert handle.swapped["norms"] == 5 and handle.swapped["mlp"] == 2
    assert sorted(calls) == ["LlamaMLP", "LlamaRMSNorm"]


def test_rotary_tables_the_kernel_cannot_take_stay_with_hf():
    """StableLM with 4-dim heads and partial_rotary_factor 0.25 rotates 1 dim with tables of
    2 (HF's code broadcasts them): the dispatcher hands such calls to HF's function, which the
    kernel's argument check would otherwise turn into an error mid-forward."""
    model = build("stablelm", hidden_size=32, num_attention_heads=8, num_key_value_heads=8)
    ids = torch.randint(1, 96, (1, 7))
    ref = model(ids).logits
    handle = fastlm.patch(model)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=2e-5)
    handle.undo()


def test_patching_gpt2_prints_no_loss_type_warning(transformers_log):
    """transformers warns that GPT-2's loss_type None is unrecognized when its loss_function is
    read (it falls back to the causal-LM loss, the right one); the patch reads it, and had made
    every patched GPT-2 (every demo run) print that. The warning is shown once a process:
    its cache is cleared so that this test can see it."""
    import logging

    config = AutoConfig.for_model("gpt2", **ARCHS["gpt2"], vocab_size=128)
    logging.Logger.warning_once.cache_clear()
    fastlm.patch(AutoModelForCausalLM.from_config(config), verbose=False)
    assert not any("is unrecognized" in m for m in transformers_log), transformers_log
    logging.Logger.warning_once.cache_clear()
    AutoModelForCausalLM.from_config(config).loss_function  # noqa: B018 (the control)
    assert any("is unrecognized" in m for m in transformers_log)

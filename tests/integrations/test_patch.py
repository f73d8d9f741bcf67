"""fastlm.patch on tiny random models of ten architectures: same logits, loss and gradients
as the eager model (fp32), the fused training loss equals HF's, same greedy generation with
the KV cache, torch.compile, undo() restores eager."""

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
    "gemma": (5, 2), "phi3": (5, 2), "gpt_neox": (5, 0), "opt": (5, 0), "bert": (5, 0),
}
LEARNED_POSITIONS = {"gpt2", "opt", "bert"}  # no rotary embedding to fuse
CAUSAL = sorted(set(ARCHS) - {"bert"})
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "opt": dict(dropout=0.0)}


def build(kind, **overrides):
    conf = AutoConfig.for_model(kind, vocab_size=96, **dict(ARCHS[kind], **overrides))
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
    assert handle.swapped.get("attention") == 1
    assert handle.swapped.get("rope", 0) == (0 if kind in LEARNED_POSITIONS else 2)
    assert ("loss" in handle.swapped) == (kind != "bert")
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


@pytest.mark.parametrize("kind", CAUSAL)
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


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma", "phi3", "gpt_neox"])
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

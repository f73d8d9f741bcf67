"""A vision-language model with images: Qwen2-VL, its vision tower (bidirectional attention,
one call per image) and its language model (multimodal RoPE, left padding) on fastlm's
attention and fused kernels, against eager. The text-only sweep over every image-text-to-text
model type (benchmarks/results/model_types_image-text-to-text.md) does not run the towers."""

import copy

import pytest
import torch

import fastlm
from fastlm.integrations import _hf_attention
from fastlm.integrations import transformers as hf

hf.register()
from transformers import AutoModelForImageTextToText, Qwen2VLConfig  # noqa: E402

IMAGE, START, END = 5, 3, 4  # token ids, inside the tiny vocabulary


def tiny_qwen2_vl():
    conf = Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         # mrope splits head_dim / 2 = 8 frequencies over (time, height, width)
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4),
        image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(conf, attn_implementation="eager")


def inputs(model):
    """Two images of different sizes (4x4 and 4x6 patches), one per row, rows left-padded."""
    vc = model.config.vision_config
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
    rows = [[7, 8, START] + [IMAGE] * (int(t.prod()) // vc.spatial_merge_size ** 2) + [END]
            + torch.randint(10, 100, (6,), generator=gen).tolist() for t in grid]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    # no target predicted from a padded position (eager averages a row with no key to attend
    # to, the kernels give 0: that position has no defined output)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                mm_token_type_ids=(ids == IMAGE).int()), labels


def run(model, kw, labels):
    model.eval()
    logits = model(**kw).logits[kw["attention_mask"].bool()]
    tokens = model.generate(**kw, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.train()
    model.zero_grad()
    model(**kw, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), tokens, grads


@pytest.fixture
def kernel_shapes(monkeypatch):
    shapes = []
    real = _hf_attention.attention

    def spy(q, *args, **kwargs):
        shapes.append((tuple(q.shape), kwargs.get("causal")))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(_hf_attention, "attention", spy)
    return shapes


def test_qwen2_vl_with_images_matches_eager(kernel_shapes):
    ref = tiny_qwen2_vl()
    fast = copy.deepcopy(ref)
    kw, labels = inputs(ref)
    want = run(ref, kw, labels)
    fast.set_attn_implementation("fastlm")
    handle = fastlm.patch(fast)
    assert {"norms", "mlp", "rope"} <= set(handle.swapped)
    got = run(fast, kw, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    assert sum("visual" in k for k in want[2]) > 10  # the tower trained too
    for k, g in want[2].items():
        torch.testing.assert_close(got[2][k], g, rtol=1e-4, atol=1e-6, msg=k)
    # the tower's calls ran in the kernel, bidirectional, one image (16 or 24 patches) each
    tower = [s for s in kernel_shapes if s[0][0] == 1 and s[0][2] in (16, 24)]
    assert tower and all(causal is False for _, causal in tower)
    assert any(causal for _, causal in kernel_shapes)  # and the language model's, causal
    handle.undo()


def test_packed_rows_in_a_model_that_hands_its_mask_to_its_language_model(kernel_calls):
    """PaliGemma builds the mask and hands it to its language model, which asks for it again
    without the position ids: fastlm rebuilt it there as plain causal, and rows packed by
    restarting positions attended across their sequences (logits off by 0.1 where eager's were
    exact). The mask built by the outer call is kept, as eager keeps a 4D mask."""
    from transformers import PaliGemmaConfig

    conf = PaliGemmaConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_token_id=127)
    torch.manual_seed(0)
    ref = AutoModelForImageTextToText.from_config(conf, attn_implementation="eager").train()
    fast = copy.deepcopy(ref)
    fast.set_attn_implementation(hf.NAME)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    pos = torch.stack([torch.cat([torch.arange(1, 10), torch.arange(1, 16)]),
                       torch.arange(1, 25)])  # PaliGemma counts positions from 1
    want = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    got = fast(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kernel_calls and all(c.get("segment_ids") is not None for c in kernel_calls)

"""The RoPE probe behind fastlm.patch: which form of HF's ``apply_rotary_pos_emb`` a function
computes (so the fused op can stand in for it), or why it is left alone. Functions written
here the ways modeling files write them, plus ones that must be refused."""

import torch

from fastlm.integrations._patch_rope import _probe


def _half_rotate(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def llama_style(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _half_rotate(q) * sin, k * cos + _half_rotate(k) * sin


def partial_llama_style(q, k, cos, sin, unsqueeze_dim=1):  # Phi-3 / GPT-NeoX
    r = cos.shape[-1]
    (qr, qp), (kr, kp) = (q[..., :r], q[..., r:]), (k[..., :r], k[..., r:])
    qe, ke = llama_style(qr, kr, cos, sin, unsqueeze_dim)
    return torch.cat([qe, qp], dim=-1), torch.cat([ke, kp], dim=-1)


def _pair_rotate(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def cohere_style(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _pair_rotate(q) * sin, k * cos + _pair_rotate(k) * sin


def gpt_oss_style(q, k, cos, sin, unsqueeze_dim=1):  # half-width tables, one per frequency
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rot(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    return rot(q), rot(k)


def wrong_direction(q, k, cos, sin, unsqueeze_dim=1):
    return llama_style(q, k, cos, -sin, unsqueeze_dim)


def whole_head_broadcast(q, k, cos, sin, unsqueeze_dim=1):
    """Rotate-half at full width; narrower tables are tiled over the head instead of rotating
    only its first dims (what the fused op does with them)."""
    reps = q.shape[-1] // cos.shape[-1]
    return llama_style(q, k, cos.repeat(1, 1, reps), sin.repeat(1, 1, reps), unsqueeze_dim)


def always_fails(q, k, cos, sin, unsqueeze_dim=1):
    raise RuntimeError("no")


def test_forms_the_fused_op_computes_are_recognised():
    assert _probe(llama_style) == ("halves", None)
    assert _probe(partial_llama_style) == ("halves", None)
    assert _probe(cohere_style) == ("pairs", None)
    assert _probe(gpt_oss_style) == ("halves_from_half_tables", None)


def test_other_functions_are_refused_with_the_reason():
    form, why = _probe(wrong_direction)
    assert form is None and "none of the forms" in why
    form, why = _probe(whole_head_broadcast)
    assert form is None and "partial rotary" in why
    form, why = _probe(always_fails)
    assert form is None and "a probe of it failed (RuntimeError: no)" in why
    form, why = _probe(lambda x, sin, cos: (x, x))
    assert form is None and "takes (x, sin, cos)" in why

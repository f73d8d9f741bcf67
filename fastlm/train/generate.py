"""``fastlm generate``: sample text from a training run/checkpoint or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch


class GenerateError(Exception):
    user_facing = True


def load_tokenizer(path: str | Path):
    """The fast tokenizer saved in ``path`` or ``path/tokenizer``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    for d in (path, path / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(d))
    raise GenerateError(f"no tokenizer in {path} (expected tokenizer.json there or in "
                        f"{path / 'tokenizer'}); prepare data with `fastlm prepare`")


@torch.no_grad()
def sample(model, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, top_p: float | None = None, device=None,
           seed: int | None = None) -> str:
    device = device or next(model.parameters()).device
    ids = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt").input_ids.to(device)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None,
                         top_k=top_k if temperature > 0 else None,
                         top_p=top_p if temperature > 0 else None,
                         pad_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def load_for_generation(path: str | Path):
    path = Path(path)
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path)), load_tokenizer(path)
    from fastlm.train.export import load_model

    model, _, run_dir = load_model(path)
    return model, load_tokenizer(run_dir)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="HF model directory, run directory or checkpoint")
    parser.add_argument("--prompt", default="", help="text to continue (default: EOS)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)


def run(args) -> int:
    if not Path(args.model).exists():
        raise GenerateError(f"{args.model} not found (give an HF directory or a fastlm run)")
    model, tok = load_for_generation(args.model)
    for i in range(args.num_samples):
        text = sample(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=None if args.seed is None else args.seed + i)
        print(text)
        if i + 1 < args.num_samples:
            print("-" * 40)
    return 0

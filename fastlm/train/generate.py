"""``fastlm generate``: sample text from a training run/checkpoint or a Hugging Face directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger("fastlm")


class GenerateError(Exception):
    user_facing = True


def tokenizer_dir(path: str | Path) -> Path | None:
    """The directory holding the tokenizer saved in ``path`` or ``path/tokenizer``, or None."""
    path = Path(path)
    for d in (path, path / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return d
    return None


def load_tokenizer(path: str | Path):
    """The fast tokenizer saved in ``path`` or ``path/tokenizer``."""
    from transformers import PreTrainedTokenizerFast

    d = tokenizer_dir(path)
    if d is None:
        raise GenerateError(f"no tokenizer in {path} (expected tokenizer.json there or in "
                            f"{Path(path) / 'tokenizer'}); prepare data with `fastlm prepare`")
    return PreTrainedTokenizerFast.from_pretrained(str(d))


def context_length(model, *, trained: bool = False) -> int | None:
    """The longest sequence the model takes: learned position tables end there (GPT-2's
    n_positions; an index past them crashes), rotary models were trained to there.
    ``trained``: no longer than the blocks a fastlm run trained it on, where its config notes
    them (see fastlm.train.model.record_trained_context): positions past them never learned."""
    from fastlm.train.model import TRAINED_CONTEXT, text_config

    conf = text_config(model)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(conf, key, None)
        if isinstance(value, int) and value > 1:
            break
    else:
        value = None
    seen = getattr(model.config, TRAINED_CONTEXT, None) if trained else None
    if isinstance(seen, int) and seen > 1:
        return seen if value is None else min(value, seen)
    return value


def sample(model, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, top_p: float | None = None, device=None,
           seed: int | None = None, chat: bool = False,
           history: list[dict] | None = None, on_text=None) -> str:
    """Prompt + up to ``max_new_tokens`` sampled tokens (fewer if EOS comes first), as text.
    ``chat``: the prompt is a user's message, after the conversation so far (``history``, chat
    messages), laid out by the tokenizer's chat template (the layout `fastlm prepare --sft`
    fine-tuned on); the answer alone comes back, ended where the template ends a response.
    ``on_text``: called with each piece of that text as it is generated (the console's
    streaming), the pieces adding up to what comes back."""
    device = device or next(model.parameters()).device
    ids, stops = encode_prompt(tokenizer, prompt, chat=chat, history=history)
    ids = torch.tensor([ids])
    if seed is not None:
        torch.manual_seed(seed)
    streamer = None if on_text is None else _TextPieces(tokenizer, on_text, with_prompt=not chat)
    out = sample_ids(model, ids.to(device), max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p,
                     pad_token_id=tokenizer.eos_token_id, eos_token_id=stops, streamer=streamer)
    if streamer is not None:
        streamer.flush()
    return tokenizer.decode(out[0, ids.shape[1]:] if chat else out[0], skip_special_tokens=True)


class _TextPieces:
    """transformers' streamer interface for one row: the text of the tokens generated so far,
    decoded whole each time (a character cut between tokens waits for the rest) and handed on
    by its new part. Each window of :func:`_generate` is a generate call that puts its
    context first: the first one's is the prompt (handed on unless ``with_prompt`` is off),
    the later ones' are text already handed on."""

    def __init__(self, tokenizer, on_text, *, with_prompt: bool):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown, self.calls, self.context_next = 0, 0, True
        self.with_prompt = with_prompt

    def put(self, value) -> None:
        if self.context_next:  # a generate call's context
            self.context_next = False
            self.calls += 1
            if not (self.calls == 1 and self.with_prompt):
                return
        self.ids += value.reshape(-1).tolist()
        self._show(final=False)

    def end(self) -> None:
        self.context_next = True

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or len(text) <= self.shown:
            return
        self.on_text(text[self.shown:])
        self.shown = len(text)

    def flush(self) -> None:
        """What is left once generation is over (bytes that never made a character)."""
        self._show(final=True)


def encode_prompt(tokenizer, prompt: str, *, chat: bool = False,
                  history: list[dict] | None = None) -> tuple[list[int], int | list[int]]:
    """(the prompt's token ids, the token id(s) that end the answer). ``chat``: the prompt is
    a user's message after ``history``, laid out by the tokenizer's chat template."""
    if not chat:
        return tokenizer(prompt or tokenizer.eos_token).input_ids, tokenizer.eos_token_id
    from fastlm.data.chat import response_stop_ids

    if not isinstance(tokenizer.chat_template, str):
        raise GenerateError("--chat: the tokenizer has no chat template (`fastlm prepare "
                            "--sft` saves one with the data a model is fine-tuned on); "
                            "leave --chat out to continue plain text")
    messages = [*(history or []), {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the template writes its own special tokens (BOS among them) as text
    return (tokenizer(text, add_special_tokens=False).input_ids,
            response_stop_ids(tokenizer))


@torch.no_grad()
def complete_batch(model, tokenizer, prompts: list[str | list[dict]], *, max_new_tokens: int,
                   temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                   chat: bool = False, system: str | None = None, device=None) -> list[str]:
    """The completion (the new text alone) of each prompt, all in one ``generate`` call:
    left-padded, each row attending to its own tokens, the KV cache shared, each row ended at
    its own stop token. Greedy, every completion is the one :func:`sample` gives the prompt
    alone. A prompt longer than the context less ``max_new_tokens`` keeps its last tokens
    (one warning). With ``chat`` a prompt may be a conversation (chat messages ending in the
    user's): the reply to its last message, the earlier ones its history."""
    device = device or next(model.parameters()).device
    opening = [] if system is None else [{"role": "system", "content": system}]
    encoded = []
    for p in prompts:
        if isinstance(p, list):
            if not chat:
                raise GenerateError("prompts given as chat messages need --chat")
            encoded.append(encode_prompt(tokenizer, p[-1]["content"], chat=True,
                                         history=opening + p[:-1]))
        else:
            encoded.append(encode_prompt(tokenizer, p, chat=chat, history=opening))
    stops = encoded[0][1]
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    new = _generate(model, [ids for ids, _ in encoded], max_new_tokens=max_new_tokens,
                    sampling=_sampling(temperature, top_k, top_p), pad_token_id=pad,
                    eos_token_id=stops, device=device)
    stop_set = _stop_set(model, stops)
    texts = []
    for row in new:
        end = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def _stop_set(model, eos_token_id) -> set[int]:
    """The tokens that end a row: ``eos_token_id`` (an id or a list), else the model's own."""
    if eos_token_id in (None, []):
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}


def _generate(model, rows: list[list[int]], *, max_new_tokens: int, sampling: dict,
              pad_token_id: int | None, eos_token_id=None, device=None,
              streamer=None) -> list[list[int]]:
    """The new tokens of each row (its stop token last where it stopped), generated with the
    KV cache, left-padded, in windows of the context the model was trained on (its physical
    one where no fastlm run noted it): a row reaching it goes on from its last half (as
    nanoGPT crops its context; one warning), a prompt that long starts from there. Positions
    past the trained context never learned: a demo model trained on blocks of 128 turned its
    samples to repeated syllables from position 128 on. Every row crops exactly where it
    would alone, so a batch gives each prompt its own completion (greedy)."""
    from fastlm.train.model import eval_mode

    device = device or next(model.parameters()).device
    ctx = context_length(model, trained=True)
    # which context it is, for the warning: a run's blocks, shorter than its position table,
    # are what a user chose and may want to raise; the table is the architecture's limit
    whose = ("the model's context" if ctx == context_length(model)
             else "the context the model was trained on (its blocks)")
    stop_set = _stop_set(model, eos_token_id)
    new: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows))) if max_new_tokens > 0 else []
    warned = False
    with eval_mode(model):
        while active:
            contexts = []
            for i in active:
                seq = rows[i] + new[i]
                if ctx is not None and len(seq) >= ctx:
                    seq = seq[-(ctx // 2):]
                    if not warned:
                        logger.warning("generation passes %s of %d tokens: it continues "
                                       "from the last %d", whose, ctx, ctx // 2)
                        warned = True
                contexts.append(seq)
            step = min(max_new_tokens - len(new[i]) for i in active)
            if ctx is not None:
                step = min(step, *(ctx - len(c) for c in contexts))
            width = max(len(c) for c in contexts)
            pad = 0 if pad_token_id is None else pad_token_id
            ids = torch.full((len(contexts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, c in enumerate(contexts):
                ids[k, width - len(c):] = torch.tensor(c)
                mask[k, width - len(c):] = 1
            out = model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=step,
                pad_token_id=pad_token_id, **sampling,
                **({} if eos_token_id in (None, []) else {"eos_token_id": eos_token_id}),
                **({} if streamer is None else {"streamer": streamer}),  # one row only
            )[:, width:].tolist()
            still = []
            for i, gen in zip(active, out):
                gen = gen[:step]
                end = next((k for k, t in enumerate(gen) if t in stop_set), None)
                new[i] += gen if end is None else gen[:end + 1]
                if end is None and len(new[i]) < max_new_tokens:
                    still.append(i)
            active = still
    return new


def _sampling(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    """generate()'s sampling arguments: greedy at temperature 0 (its sampling knobs unset)."""
    on = temperature > 0
    return {"do_sample": on, "temperature": temperature if on else None,
            "top_k": top_k if on else None, "top_p": top_p if on else None}


@torch.no_grad()
def sample_ids(model, ids: torch.Tensor, *, max_new_tokens: int, temperature: float,
               top_k: int | None, top_p: float | None, pad_token_id: int | None,
               eos_token_id: int | list[int] | None = None, streamer=None) -> torch.Tensor:
    """(1, prompt + new) token ids, in windows of the model's trained context (see
    :func:`_generate`). ``eos_token_id``: where to stop (default: the model's own)."""
    (new,) = _generate(model, [ids[0].tolist()], max_new_tokens=max_new_tokens,
                       sampling=_sampling(temperature, top_k, top_p), pad_token_id=pad_token_id,
                       eos_token_id=eos_token_id, device=ids.device, streamer=streamer)
    return torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)


def load_model_dir(path: str | Path):
    """(model, the directory its tokenizer would be in) from an HF directory, a PEFT adapter
    directory (its base + the adapters, merged), a run directory or a checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        from fastlm.train.model import load_lm

        return load_lm(path), path
    if (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path)
    from fastlm.train.export import load_model

    model, _, run_dir = load_model(path)
    return model, run_dir


def _load_adapter_dir(path: Path):
    import json

    from fastlm.train.lora import _peft
    from fastlm.train.model import load_lm

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise GenerateError(f"{path} is an adapter directory whose base model {base!r} is not a "
                            f"local Hugging Face directory (nothing is downloaded); set "
                            f"base_model_name_or_path in its adapter_config.json to one")
    model = _peft().PeftModel.from_pretrained(load_lm(base), str(path))
    # the adapters folded in: a plain model, as fast as the base
    return model.merge_and_unload(), (path if tokenizer_dir(path) else Path(base))


def load_for_generation(path: str | Path):
    model, root = load_model_dir(path)
    return model, load_tokenizer(root)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="HF model directory, PEFT adapter directory (its base "
                        "a local directory), run directory or checkpoint")
    parser.add_argument("--prompt", default="", help="text to continue (default: EOS)")
    from fastlm.cli import at_least, probability

    parser.add_argument("--max-new-tokens", type=at_least(1), default=200)
    parser.add_argument("--temperature", type=at_least(0.0, float), default=0.8,
                        help="0 = greedy")
    parser.add_argument("--top-k", type=at_least(0), default=50, help="0 = off")
    parser.add_argument("--top-p", type=probability, default=None, help="in (0, 1]")
    parser.add_argument("--chat", action="store_true", help="the prompt is a user's message "
                        "in the chat template of the model's fine-tuning data; print the reply")
    parser.add_argument("--interactive", action="store_true",
                        help="prompts on stdin, one a line, each completion printed; with "
                        "--chat a conversation, one user message a line (the replies keep the "
                        "history; /reset starts over); /exit or EOF ends")
    parser.add_argument("--system", default=None,
                        help="with --chat: a system message opening the conversation")
    parser.add_argument("--num-samples", type=at_least(1), default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="complete every prompt of FILE (.jsonl records with a 'prompt', "
                        "or with --chat 'messages' ending in the user's; or text, a prompt a "
                        "line), --batch-size at a time; JSONL {prompt, sample, completion} "
                        "rows to --out or stdout")
    parser.add_argument("--out", default=None, help="with --prompts: the JSONL file to write")
    parser.add_argument("--batch-size", type=at_least(1), default=8,
                        help="with --prompts: prompts completed together")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on a CPU, bf16 on a GPU that has it")


def run(args) -> int:
    if not Path(args.model).exists():
        raise GenerateError(f"{args.model} not found (give an HF directory or a fastlm run)")
    if args.system is not None and not args.chat:
        raise GenerateError("--system opens a conversation with a chat model: add --chat")
    if args.prompts is not None:
        if args.interactive or args.prompt:
            raise GenerateError("--prompts completes a file of prompts: drop --prompt and "
                                "--interactive")
        prompts = read_prompts(args.prompts)
        if not args.chat and any(isinstance(p, list) for p in prompts):
            raise GenerateError("--prompts: records with 'messages' are conversations: add "
                                "--chat")
    elif args.out is not None:
        raise GenerateError("--out writes the completions of --prompts FILE: add --prompts")
    from fastlm.train.evaluate import EvalError, device_and_dtype, place_model

    try:
        device, dtype = device_and_dtype(args.device, args.dtype)
    except EvalError as exc:
        raise GenerateError(str(exc)) from exc
    model, tok = load_for_generation(args.model)
    # on the GPU where there is one (it always ran on the CPU, in the checkpoint's dtype)
    place_model(model, device, dtype, kernels=False)
    if args.prompts is not None:
        return _complete_file(model, tok, prompts, args)
    if args.interactive:
        return _converse(model, tok, args)
    history = [] if args.system is None else [{"role": "system", "content": args.system}]
    for i in range(args.num_samples):
        sample(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=None if args.seed is None else args.seed + i, chat=args.chat,
               history=history, on_text=_print_piece)
        print(flush=True)
        if i + 1 < args.num_samples:
            print("-" * 40)
    return 0


def _converse(model, tok, args) -> int:
    """Read user messages from stdin, print each reply; the conversation is the history.
    Without --chat each line is a prompt of its own, printed with its completion (as
    ``--prompt`` prints it)."""
    import sys

    opening = [] if args.system is None else [{"role": "system", "content": args.system}]
    history = list(opening)
    prompt = ("user> " if args.chat else "> ") if sys.stdin.isatty() else ""
    for i, line in enumerate(_lines(prompt)):
        message = line.strip()
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = list(opening)
            continue
        if not message:
            continue
        reply = sample(model, tok, line if not args.chat else message,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p,
                       seed=None if args.seed is None else args.seed + i, chat=args.chat,
                       history=history, on_text=_print_piece)
        print(flush=True)
        if args.chat:
            history += [{"role": "user", "content": message},
                        {"role": "assistant", "content": reply}]
    return 0


def _print_piece(text: str) -> None:
    """The console shows the text as it is generated (a big model's reply takes seconds)."""
    print(text, end="", flush=True)


def _lines(prompt: str):
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """The prompts of a .jsonl file (records with a string 'prompt', or 'messages': a chat
    conversation ending in the user's message) or a text file (one a line, blank lines
    skipped)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"--prompts: {path} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GenerateError(f"--prompts: {path}:{n} is not JSON ({exc.msg})") from exc
            if isinstance(record, dict) and "messages" in record:
                prompts.append(_conversation(record["messages"], f"{path}:{n}"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise GenerateError(f"--prompts: {path}:{n} has no string 'prompt' (records "
                                    f"are {{\"prompt\": \"...\"}} or {{\"messages\": "
                                    f"[...]}})")
            prompts.append(record["prompt"])
    if not prompts:
        raise GenerateError(f"--prompts: {path} holds no prompt")
    return prompts


def _conversation(messages, where: str) -> list[dict]:
    ok = (isinstance(messages, list) and messages
          and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                  and isinstance(m.get("content"), str) for m in messages))
    if not ok or messages[-1]["role"] != "user":
        raise GenerateError(f"--prompts: {where}: 'messages' must be a list of {{role, "
                            f"content}} messages ending in the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _complete_file(model, tok, prompts: list[str | list[dict]], args) -> int:
    """Every prompt's --num-samples completions, --batch-size prompts a generate call, as JSONL
    rows in the prompts' order; --out is written whole or not at all (a temporary file renamed
    at the end)."""
    import json
    import os
    import sys
    import tempfile

    from tqdm import tqdm

    from fastlm._fs import shareable

    if args.seed is not None:
        torch.manual_seed(args.seed)
    jobs = [(p, k) for p in prompts for k in range(args.num_samples)]
    out = sys.stdout
    tmp = None
    if args.out is not None:
        target = Path(args.out)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        out = os.fdopen(fd, "w", encoding="utf-8")
    try:
        with tqdm(total=len(jobs), desc="generate", unit="completion",
                  disable=args.out is None) as bar:
            for i in range(0, len(jobs), args.batch_size):
                batch = jobs[i:i + args.batch_size]
                texts = complete_batch(
                    model, tok, [p for p, _ in batch], max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    chat=args.chat, system=args.system)
                for (prompt, k), text in zip(batch, texts):
                    out.write(json.dumps({"prompt": prompt, "sample": k, "completion": text},
                                         ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(batch))
        if tmp is not None:
            out.close()
            shareable(tmp)  # mkstemp's 0600: as open would make it
            os.replace(tmp, args.out)
            tmp = None
            print(f"wrote {len(jobs)} completions to {args.out}", file=sys.stderr)
    finally:
        if tmp is not None:
            out.close()
            os.unlink(tmp)
    return 0

"""Fine-tuning conversations: rendered with a chat template, the responses marked for the loss.

A model fine-tuned on conversations must see them at inference in the layout it was trained
on. So ``fastlm prepare --sft`` renders every record with a chat template and saves that
template with the prepared tokenizer (it travels into the run, the export and
``fastlm generate --chat``; transformers' ``apply_chat_template`` reads it):

- ``auto`` (default): the tokenizer's own template when it has one (an instruct model's
  directory given as ``--tokenizer``), else fastlm's (:data:`FASTLM_TEMPLATE`);
- ``fastlm``: always fastlm's; a path: a Jinja template file.

Which characters are a response is read off the template itself: the conversation up to an
assistant message, rendered with the generation prompt, must be the start of the whole
rendering, and the conversation up to and including the message must be too; the characters
between the two are that response (with its end-of-turn marker, so the model learns to stop).
A template that rewrites earlier turns (Qwen3's drops their reasoning) breaks that rule for
multi-turn records: an error, never a guessed mask.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastlm.data.errors import DataError

# Every message opens with its role's marker; a response ends with EOS (trained on: the model
# learns to stop after each answer, also between turns of a longer conversation).
FASTLM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


class ChatTemplate:
    """A Jinja chat template with the special-token strings it may use (``eos_token``...)."""

    def __init__(self, template: str, specials: dict, source: str):
        self.template, self.specials, self.source = template, specials, source

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt,
                                            **self.specials)
        return rendered[0]

    def segments(self, messages: list[dict], where: str) -> list[tuple[str, int]]:
        """(text, 1 if trained on) pieces whose concatenation is the rendered conversation."""
        try:
            full = self.render(messages)
            pieces, pos = [], 0
            for i, m in enumerate(messages):
                if m.get("role") != "assistant":
                    continue
                start = len(self.render(messages[:i], add_generation_prompt=True))
                before, upto = full[:start], self.render(messages[:i + 1])
                if start < pos or not full.startswith(upto) or not upto.startswith(before):
                    raise DataError(
                        f"{where}: the chat template ({self.source}) renders the conversation "
                        f"up to message {i} otherwise than the start of the whole conversation "
                        f"(it rewrites earlier turns), so its responses cannot be told apart; "
                        f"give one record per assistant turn, or pass --chat-template fastlm")
                pieces += [(full[pos:start], 0), (full[start:len(upto)], 1)]
                pos = len(upto)
            pieces.append((full[pos:], 0))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - jinja errors, raise_exception() in templates
            raise DataError(f"{where}: the chat template ({self.source}) failed: "
                            f"{type(exc).__name__}: {exc}") from exc
        return [(text, flag) for text, flag in pieces if text]

    def setting(self) -> str:
        """What identifies the template in prepare's settings (a file's content counts)."""
        digest = hashlib.blake2b(self.template.encode(), digest_size=8).hexdigest()
        return f"{self.source}:{digest}"


def resolve(choice: str, tokenizer: str) -> ChatTemplate:
    """The template ``--chat-template CHOICE`` means for ``--tokenizer TOKENIZER``."""
    from fastlm.data.tokenizer import EOS

    specials = {"eos_token": EOS, "bos_token": EOS, "pad_token": EOS}
    own = None
    if tokenizer not in ("bpe", "byte", "char") and Path(tokenizer).is_dir():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as exc:  # noqa: BLE001 - copy_pretrained reports it with its fix
            raise DataError(f"cannot load a tokenizer from {tokenizer}: {exc}") from exc
        specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
        own = tok.chat_template if isinstance(tok.chat_template, str) else None
    if choice == "auto":
        if own is not None:
            return ChatTemplate(own, specials, f"the chat template of {tokenizer}")
        return ChatTemplate(FASTLM_TEMPLATE, specials, "fastlm's chat template")
    if choice == "fastlm":
        return ChatTemplate(FASTLM_TEMPLATE, specials, "fastlm's chat template")
    path = Path(choice)
    if not path.is_file():
        raise DataError(f"--chat-template {choice!r} is neither 'auto', 'fastlm' nor a Jinja "
                        f"template file")
    return ChatTemplate(path.read_text(), specials, str(path))


def response_stop_ids(tok) -> list[int]:
    """Token ids that end a response under ``tok``'s chat template: EOS, and the first token
    the template writes after an assistant message (Llama 3's <|eot_id|>, ChatML's
    <|im_end|>), so that generation stops where the fine-tuned model learned to."""
    user = [{"role": "user", "content": "?"}]
    start = len(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "!"}],
                                   tokenize=False)
    after = full[start:].split("!", 1)[-1]
    ids = tok(after, add_special_tokens=False).input_ids if after else []
    stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if ids and ids[0] not in stops:
        stops.append(ids[0])
    return stops

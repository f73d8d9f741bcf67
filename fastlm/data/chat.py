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
multi-turn records: each is split into one example per assistant turn (announced), never a
guessed mask.
"""

from __future__ import annotations

import contextlib
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


# Record layouts accepted as fine-tuning data, each turned into a list of messages. The
# columns that tell them apart, in the order they are tried.
FORMATS = {
    "messages": ("messages",),  # OpenAI / transformers chat: [{role, content}]
    "sharegpt": ("conversations",),  # [{from: human|gpt|system, value}] (or role/content)
    "prompt": ("prompt", "response"),
    "alpaca": ("instruction", "output"),  # + optional input
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "model": "assistant", "bot": "assistant",
                   "chatgpt": "assistant", "system": "system"}


def detect_format(columns: list[str], where: str) -> str:
    for name, needs in FORMATS.items():
        if all(c in columns for c in needs):
            return name
    raise DataError(f"{where}: fine-tuning records need one of: a 'messages' list of "
                    f"{{role, content}}, a ShareGPT 'conversations' list of {{from, value}}, "
                    f"'prompt' and 'response' fields, or Alpaca's 'instruction' (+ 'input') and "
                    f"'output'; found columns {columns}")


def to_messages(row: dict, where: str) -> list[dict]:
    """``row`` as [{"role", "content"}] (content never None), in the first layout of
    :data:`FORMATS` whose fields it fills (a file may mix them: null where unused)."""
    fmt = next((name for name, needs in FORMATS.items()
                if all(row.get(c) is not None for c in needs)), None)
    if fmt is None:
        raise DataError(f"{where}: a fine-tuning record with none of the layouts filled "
                        f"(messages, conversations, prompt + response, instruction + output): "
                        f"{str(row)[:200]}")
    if fmt in ("prompt", "alpaca"):
        ask, answer = FORMATS[fmt]
        prompt = row[ask]
        if fmt == "alpaca" and row.get("input"):
            prompt = f"{prompt}\n\n{row['input']}"
        return [{"role": "user", "content": str(prompt)},
                {"role": "assistant", "content": str(row[answer])}]
    turns = row.get(FORMATS[fmt][0])
    if not isinstance(turns, list):
        raise DataError(f"{where}: {FORMATS[fmt][0]!r} is not a list of messages: "
                        f"{str(turns)[:200]}")
    out = []
    for m in turns:
        if not isinstance(m, dict):
            raise DataError(f"{where}: a message that is not an object: {str(m)[:200]}")
        if fmt == "sharegpt" and m.get("from") is not None:
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower(), m["from"])
            content = m.get("value")
        else:
            role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(f"{where}: a message without a role ({str(m)[:200]}); each "
                            f"message needs 'role' (user, assistant, system...) and 'content'")
        out.append({"role": role, "content": _text(content, where)})
    return out


def to_preference(row: dict, where: str) -> tuple[list[dict], list[dict]]:
    """A preference record as (chosen, rejected) conversations, each ending in the answer
    compared: ``prompt`` (a string or messages) + ``chosen`` / ``rejected`` (a string or the
    answer's messages), or ``chosen`` / ``rejected`` as whole conversations (Anthropic's HH
    layout) that differ in their last answer."""
    if row.get("chosen") is None or row.get("rejected") is None:
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' (with a "
                        f"'prompt', or as whole conversations): {str(row)[:200]}")

    def messages(value, role: str) -> list[dict]:
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        return to_messages({"messages": value}, where)

    prompt = [] if row.get("prompt") is None else messages(row["prompt"], "user")
    pair = tuple(prompt + messages(row[k], "assistant") for k in ("chosen", "rejected"))
    for name, conv in zip(("chosen", "rejected"), pair):
        if len(conv) < 2 or conv[-1]["role"] != "assistant":
            raise DataError(f"{where}: the {name} conversation must end in an assistant's "
                            f"answer after a prompt: {str(conv)[:200]}")
    return pair


def _text(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts (the text
    parts joined; an image or audio part cannot go into a text model's data: an error)."""
    if content is None:
        return ""
    if not isinstance(content, list):
        return str(content)
    other = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content
             if not (isinstance(p, dict) and p.get("type", "text") == "text")]
    if other:
        raise DataError(f"{where}: a message with {other[0]!r} content; fastlm fine-tunes on "
                        f"text: keep the text parts only")
    return "".join(p.get("text") or "" for p in content)


class _Rewritten(Exception):
    """The rendering up to assistant message ``args[0]`` does not begin the whole one."""


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

    def examples(self, messages: list[dict], where: str) -> list[list[tuple[str, int]]]:
        """The conversation as one example of (text, trained) pieces. Where the template
        renders an earlier turn otherwise once later turns follow (Qwen3 drops an answer's
        reasoning then), the characters of that turn cannot be found in the whole rendering:
        one example per assistant turn instead, that turn last and the only one trained (the
        caller announces it)."""
        with self._errors(where):
            try:
                return [self._pieces(messages, last_only=False)]
            except _Rewritten:
                pass
            turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
            return [self._pieces(messages[:i + 1], last_only=True) for i in turns]

    def final_answer(self, messages: list[dict], where: str) -> list[tuple[str, int]]:
        """(text, trained) pieces of the conversation with its last answer alone trained."""
        with self._errors(where):
            return self._pieces(messages, last_only=True)

    @contextlib.contextmanager
    def _errors(self, where: str):
        """A response the template does not render as its prompt's continuation, or the
        template failing, as a DataError naming the record."""
        try:
            yield
        except _Rewritten as turn:
            raise DataError(
                f"{where}: the chat template ({self.source}) does not render message "
                f"{turn.args[0]} as the continuation of its generation prompt, so the response "
                f"cannot be told apart; pass --chat-template fastlm or a template file") from None
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - jinja errors, raise_exception() in templates
            raise DataError(f"{where}: the chat template ({self.source}) failed: "
                            f"{type(exc).__name__}: {exc}") from exc

    def _pieces(self, messages: list[dict], last_only: bool) -> list[tuple[str, int]]:
        full = self.render(messages)
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        pieces, pos = [], 0
        for i in turns[-1:] if last_only else turns:
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if len(prompt) < pos or len(upto) < len(prompt) or not full.startswith(prompt) \
                    or not full.startswith(upto):
                raise _Rewritten(i)
            pieces += [(full[pos:len(prompt)], 0), (full[len(prompt):len(upto)], 1)]
            pos = len(upto)
        pieces.append((full[pos:], 0))
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

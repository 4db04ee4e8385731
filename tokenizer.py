"""Tokenizer of a Hugging Face checkpoint directory: `tokenizer.json` or SentencePiece `tokenizer.model`.

When a directory holds both, `tokenizer.json` is used, as `transformers` does by default.
Special tokens, BOS/EOS and the chat template come from tokenizer_config.json, config.json,
generation_config.json and chat_template.jinja when present.
"""
import json
import re
from functools import cached_property
from pathlib import Path

import jinja2
import sentencepiece
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")  # and the CJK full stop, exclamation and question marks


class TokenizerError(Exception):
    """A tokenizer file, its configuration or a chat template cannot be used."""


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from e


def token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def id_list(value) -> list[int]:
    """config.json and generation_config.json write eos_token_id as an int or a list."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class SentencePieceBackend:
    def __init__(self, path: Path):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.special_ids = frozenset(
            i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i))
        pieces = sorted((self.sp.id_to_piece(i) for i in self.special_ids), key=len, reverse=True)
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, pieces)) + ")")

    def adds_bos(self, bos_id) -> bool:
        """SentencePiece Llama models (Llama-2, llama2.c) are trained with BOS first."""
        return True

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        # re.split with a group alternates plain text (even indices) and special pieces (odd).
        ids = []
        for k, part in enumerate(self.special_pattern.split(text)):
            if k % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in self.special_ids])


class HFTokenizersBackend:
    bos_id = eos_id = None

    def __init__(self, path: Path):
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for unreadable files
            raise TokenizerError(f"{path}: not a tokenizers file ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def adds_bos(self, bos_id) -> bool:
        """Whether the post-processor puts BOS first when special tokens are requested."""
        return bos_id is not None and self.tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class Tokenizer:
    """Text <-> ids for one checkpoint directory, plus what generation needs: BOS, EOS, chat template.

    bos_prefix is [bos_id] when the model expects BOS at a sequence start: add_bos_token in
    tokenizer_config.json when present, else whether tokenizer.json's post-processor prepends BOS,
    else yes for SentencePiece. eos_ids gathers every EOS the configuration files name.
    model_config: the checkpoint's config.json as a dict where the caller has read it (the engine
    reads it once for the model, the tokenizer and the methods); otherwise it is read here, if present.
    """

    def __init__(self, backend, path: Path, model_config: dict | None = None):
        self.backend = backend
        self.path = path
        self.vocab_size = backend.vocab_size
        tokenizer_config = read_json(path / "tokenizer_config.json")
        if model_config is None:
            model_config = read_json(path / "config.json")
        generation_config = read_json(path / "generation_config.json")

        def lookup(token):
            return backend.token_to_id(token) if token else None

        bos_text = token_text(tokenizer_config.get("bos_token"))
        eos_text = token_text(tokenizer_config.get("eos_token"))
        self.bos_id = next((i for i in (lookup(bos_text), model_config.get("bos_token_id"),
                                        generation_config.get("bos_token_id"), backend.bos_id)
                            if i is not None), None)
        eos_ids = {*id_list(generation_config.get("eos_token_id")),
                   *id_list(model_config.get("eos_token_id")), *id_list(lookup(eos_text))}
        if not eos_ids and backend.eos_id is not None:
            eos_ids = {backend.eos_id}
        self.eos_ids = frozenset(eos_ids)
        add_bos = tokenizer_config.get("add_bos_token")
        if add_bos is None:
            add_bos = backend.adds_bos(self.bos_id)
        self.bos_prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        self.bos_token = bos_text or (backend.id_to_token(self.bos_id) if self.bos_id is not None else "")
        self.eos_token = eos_text or (backend.id_to_token(min(self.eos_ids)) if self.eos_ids else "")

        # chat_template.jinja wins over tokenizer_config.json, as in transformers
        self.chat_template_file = path / "chat_template.jinja"
        if self.chat_template_file.is_file():
            self.chat_template = self.chat_template_file.read_text(encoding="utf-8")
        else:
            self.chat_template_file = path / "tokenizer_config.json"
            self.chat_template = tokenizer_config.get("chat_template")
            if isinstance(self.chat_template, list):  # named templates: [{"name": ..., "template": ...}]
                self.chat_template = next(
                    (t["template"] for t in self.chat_template if t.get("name") == "default"), None)

    @classmethod
    def from_dir(cls, path, model_config: dict | None = None) -> "Tokenizer":
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(HFTokenizersBackend(path / "tokenizer.json"), path, model_config)
        if (path / "tokenizer.model").is_file():
            return cls(SentencePieceBackend(path / "tokenizer.model"), path, model_config)
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS; special-token strings in it become their ids."""
        return self.backend.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.backend.decode([int(i) for i in ids])

    @cached_property
    def sentence_end_ids(self) -> frozenset:
        """Tokens after which a sentence or a line has ended: their text ends with . ! ? (trailing
        spaces aside) or holds a line break. ParallelComp may cut its chunks after them."""
        texts = ((i, self.backend.decode([i])) for i in range(self.vocab_size))
        return frozenset(i for i, text in texts if text.rstrip(" ").endswith(SENTENCE_ENDS) or "\n" in text)

    @cached_property
    def compiled_chat_template(self) -> jinja2.Template:
        def raise_exception(message):
            raise TokenizerError(f"{self.chat_template_file}: chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.chat_template_file}: chat template: {e}") from e

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), as the model was tuned on."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.path}: no chat template "
                                 "(tokenizer_config.json has no chat_template, no chat_template.jinja)")
        try:
            return self.compiled_chat_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.chat_template_file}: chat template: {e}") from e


class StreamDecoder:
    """Turns ids, one at a time, into the text decode(all ids) would give, as soon as it is printable.

    Each step decodes a short window: the ids printed by the previous step (or the context) and
    the new ones; the new text is the window's text minus the text of its printed part. Decoding
    with what came before keeps word-initial spaces that SentencePiece drops at the start of a
    decode, and the window stays a few tokens long, so a push costs O(1).
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.window = list(context_ids)
        self.printed = len(self.window)  # window[:printed] is context or already returned text

    def push(self, token_id: int) -> str:
        self.window.append(token_id)
        return self.advance(hold_partial=True)

    def flush(self) -> str:
        return self.advance(hold_partial=False)

    def advance(self, hold_partial: bool) -> str:
        known = self.tokenizer.decode(self.window[:self.printed])
        text = self.tokenizer.decode(self.window)
        if hold_partial and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        self.window = self.window[self.printed:]
        self.printed = len(self.window)
        return text[len(known):]

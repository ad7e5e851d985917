"""Text <-> token ids for serving: the folder's tokenizer or the project's bytes, chat prompts,
and incremental detokenization for streaming."""

from __future__ import annotations

from pathlib import Path

from power_retention.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, PretrainedTokenizer

# Files by which a folder holds a transformers tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Used when the tokenizer has no chat template: one block per message, then the assistant's tag.
FALLBACK_ROLE_TAG = "<|{role}|>\n"
FALLBACK_STOP = ("\n<|user|>", "\n<|system|>")


class TextTokenizer:
    """What serving needs of a tokenizer: prompts to ids, ids to text, chat formatting.

    Wraps either a transformers tokenizer (``PretrainedTokenizer``) or the project's
    :class:`ByteTokenizer` (UTF-8 bytes as ids 0..255, ``256 = <|endoftext|>``). Prompts start
    with the tokenizer's own beginning: a transformers tokenizer adds its special tokens, the byte
    tokenizer ``<|endoftext|>`` (training writes it before every document).
    """

    def __init__(self, inner: ByteTokenizer | PretrainedTokenizer) -> None:
        self.inner = inner
        self.eos_token_id = int(inner.eos_token_id)
        self.vocab_size = int(inner.vocab_size)

    @property
    def is_bytes(self) -> bool:
        return isinstance(self.inner, ByteTokenizer)

    @property
    def chat_template(self) -> str | None:
        if self.is_bytes:
            return None
        return getattr(self.inner.tokenizer, "chat_template", None) or None

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids, beginning-of-text included."""
        if self.is_bytes:
            return [self.eos_token_id] + self.inner.encode(text).tolist()
        return list(self.inner.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self.is_bytes:
            return self.inner.decode(ids)
        return self.inner.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], tuple[str, ...]]:
        """Ids of a chat prompt ending where the assistant speaks, and the stop strings it implies.

        With a chat template: ``apply_chat_template(messages, add_generation_prompt=True)``.
        Without one, each message becomes ``<|role|>\\n content \\n`` followed by
        ``<|assistant|>\\n``, and generation stops where the model starts another user or system
        block.
        """
        template = self.chat_template
        if template is not None:
            text = self.inner.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
            return list(self.inner.tokenizer(text, add_special_tokens=False)["input_ids"]), ()
        text = "".join(FALLBACK_ROLE_TAG.format(role=m["role"]) + m["content"] + "\n"
                       for m in messages)
        text += FALLBACK_ROLE_TAG.format(role="assistant")
        return self.encode_prompt(text), FALLBACK_STOP

    def __repr__(self) -> str:
        return f"TextTokenizer({self.inner!r})"


def load_text_tokenizer(folder: str | Path | None) -> TextTokenizer:
    """The tokenizer saved in ``folder``, or the byte tokenizer when it holds none."""
    if folder is not None:
        folder = Path(folder)
        if (folder / TOKENIZER_FILE).exists():
            from power_retention.data.tokenizer import load_tokenizer
            return TextTokenizer(load_tokenizer(folder))
        if any((folder / name).exists() for name in TOKENIZER_FILES):
            return TextTokenizer(PretrainedTokenizer(folder))
    return TextTokenizer(ByteTokenizer())


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces for streaming.

    Decodes a short window of recent ids and emits only what the newest id added, holding back
    while the text ends in an incomplete character (U+FFFD): a byte tokenizer splits one
    character over several ids, and BPE tokenizers attach spaces to neighbouring tokens.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0     # start of the window decoded for context
        self.read_offset = 0       # ids before this are already emitted

    def push(self, token: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end becomes U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):]

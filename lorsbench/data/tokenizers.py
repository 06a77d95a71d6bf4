"""A self-contained byte-level tokenizer for models with random weights (tests, efficiency runs).

Ids 0-255 are the raw UTF-8 bytes (through the GPT-2 byte-to-unicode alphabet, so every string round-trips),
followed by `<s>`, `</s>`, `<pad>`. Built in memory with the `tokenizers` library: nothing is downloaded.
"""
from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
NUM_BYTES = 256
BYTE_TOKENIZER_SIZE = NUM_BYTES + 3

# A ChatML template, so chat-style code paths (apply_chat_template) work on random models too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """The byte tokenizer: `BYTE_TOKENIZER_SIZE` tokens, adds `<s>` in front (as LLaMA tokenizers do),
    right padding with `<pad>`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes 0..255
    byte_to_char = sorted(alphabet, key=_byte_value)
    vocab = {char: idx for idx, char in enumerate(byte_to_char)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # add_prefix_space=False: keep the text exactly; use_regex=False: one byte = one token, no word split needed
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS, PAD])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="right", model_max_length=model_max_length,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _byte_value(char: str) -> int:
    """Inverse of GPT-2's byte-to-unicode map: printable Latin-1 bytes map to themselves, the other 68 bytes
    to U+0100 upwards in byte order."""
    code = ord(char)
    if code < 256:
        return code
    unprintable = [b for b in range(256) if not _printable(b)]
    return unprintable[code - 256]


def _printable(byte: int) -> bool:
    return ord("!") <= byte <= ord("~") or ord("¡") <= byte <= ord("¬") or ord("®") <= byte <= ord("ÿ")

"""A word-level tokenizer built offline with the `tokenizers` library, and the chat template shared by all families.

Every tiny family uses the same conversation layout, `<s> user : <image> what color ? assistant : red </s>`; only
the text written where an image block is differs (`<image>` for LLaVA, `<|vision_start|><|image_pad|><|vision_end|>`
for Qwen, ...), see [`make_chat_template`].
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# Words the chat template writes itself; they must be in the vocabulary or they would encode as <unk>.
TEMPLATE_WORDS = ("system", "user", "assistant")


def make_chat_template(image_placeholder: str = IMAGE_TOKEN, *, bos: bool = True) -> str:
    """
    The chat template of the tiny processors, writing `image_placeholder` where a message has an image block.

    Content may be a string or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` blocks (TRL's
    conversational format). Every assistant turn ends with `</s>` so the model learns to stop, and sits inside
    `{% generation %}` so that `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the answer
    and its `</s>`. The processor then expands each placeholder into the family's image tokens.

    Args:
        image_placeholder (`str`, *optional*, defaults to `"<image>"`):
            Text written for each image block, as the family's processor expects it in its input text.
        bos (`bool`, *optional*, defaults to `True`):
            Whether the template starts with the BOS token (PaliGemma's processor inserts it itself).

    Returns:
        `str`: the Jinja template.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_word_tokenizer, make_chat_template
    >>> tokenizer = build_word_tokenizer(["red"], chat_template=make_chat_template("<image>"))
    >>> messages = [
    ...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "color ?"}]},
    ...     {"role": "assistant", "content": "red"},
    ... ]
    >>> tokenizer.apply_chat_template(messages, tokenize=False)
    '<s> user : <image> color ? assistant : red </s>'
    ```
    """
    return (
        ("{{- bos_token }}" if bos else "") + "{%- for message in messages %}"
        "{{- ' ' + message['role'] + ' :' }}"
        "{%- if message['content'] is string %}{%- set blocks = [{'type': 'text', 'text': message['content']}] %}"
        "{%- else %}{%- set blocks = message['content'] %}{%- endif %}"
        "{%- if message['role'] == 'assistant' %}{%- generation %}"
        "{%- for block in blocks %}{%- if block['type'] == 'text' %}{{- ' ' + block['text'] }}{%- endif %}{%- endfor %}"
        "{{- ' ' + eos_token }}"
        "{%- endgeneration %}"
        "{%- else %}"
        "{%- for block in blocks %}"
        "{%- if block['type'] == 'image' %}{{- ' " + image_placeholder + "' }}"
        "{%- elif block['type'] == 'text' %}{{- ' ' + block['text'] }}{%- endif %}"
        "{%- endfor %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- ' assistant :' }}{%- endif %}"
    )


# The LLaVA template: `<s> user : <image> what color is the circle ? assistant : red </s>`.
CHAT_TEMPLATE = make_chat_template(IMAGE_TOKEN)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on whitespace, then isolate every punctuation character: "red?" -> "red", "?".
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _split_words(words: Iterable[str]) -> list[str]:
    normalizer, pre_tokenizer = normalizers.Lowercase(), _pre_tokenizer()
    pieces = set()
    for word in words:
        pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word)))
    return sorted(pieces)


def build_word_tokenizer(
    words: Iterable[str],
    *,
    extra_special_tokens: Iterable[str] = (),
    named_special_tokens: Mapping[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """
    Build a lower-casing word-level tokenizer whose vocabulary is exactly the special tokens, the template words,
    the ASCII punctuation and `words`.

    Ids are deterministic for a given set of words: the special tokens come first (`<pad>`=0, `<unk>`=1, `<s>`=2,
    `</s>`=3, `<image>`=4), then the values of `named_special_tokens` and `extra_special_tokens` in order, then the
    template words, punctuation and `words` (sorted, so a `set` gives the same ids in every process). Decoding joins
    words with spaces.

    Args:
        words (`Iterable[str]`):
            Words of the vocabulary. They are lower-cased and split like text is (`"red?"` gives `"red"` and `"?"`);
            duplicates are ignored. Unknown words encode as `<unk>`.
        extra_special_tokens (`Iterable[str]`, *optional*, defaults to `()`):
            More special tokens (never split, skipped by `decode(..., skip_special_tokens=True)`).
        named_special_tokens (`Mapping[str, str]`, *optional*):
            Model-specific special tokens by attribute name, e.g. `{"image_token": "<|image_pad|>"}`: the tokenizer
            gets `tokenizer.image_token` and `tokenizer.image_token_id`, saved with it (processors read these).
            Names must end with `_token`; `image_token` defaults to `"<image>"`.
        chat_template (`str`, *optional*, defaults to `CHAT_TEMPLATE`):
            The tokenizer's chat template (LLaVA's `<image>` placeholder by default, see [`make_chat_template`]).
        padding_side (`str`, *optional*, defaults to `"right"`):
            Padding side, saved with the tokenizer (setting the attribute later is not saved by `save_pretrained`).

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: the tokenizer, with `pad`/`unk`/`bos`/`eos` tokens, the named
        special tokens as attributes and the chat template set.

    Example:

    ```python
    >>> from hf_sparse_mllm.tiny import build_word_tokenizer
    >>> tokenizer = build_word_tokenizer(["what", "color", "red"])
    >>> tokenizer.tokenize("What color? red")
    ['what', 'color', '?', 'red']
    >>> tokenizer.decode(tokenizer("what color ? red </s>", add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    'what color? red'
    >>> qwen = build_word_tokenizer(["red"], named_special_tokens={"image_token": "<|image_pad|>"})
    >>> qwen.image_token, qwen.image_token_id, qwen.tokenize("<|image_pad|><|image_pad|>red")
    ('<|image_pad|>', 5, ['<|image_pad|>', '<|image_pad|>', 'red'])
    ```
    """
    named = {"image_token": IMAGE_TOKEN, **(named_special_tokens or {})}
    bad_names = [name for name in named if not name.endswith("_token")]
    if bad_names:
        raise ValueError(f"named_special_tokens names must end with '_token' (e.g. 'image_token'), got {bad_names}")
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *named.values(), *extra_special_tokens]))
    extra = specials[len(SPECIAL_TOKENS) :]
    plain = [w for w in _split_words([*TEMPLATE_WORDS, *string.punctuation, *words]) if w not in specials]
    vocab = {token: i for i, token in enumerate([*specials, *plain])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer()
    # WordPiece's decoder joins tokens with spaces (no "##" pieces exist in a word vocabulary) and tidies " ?" to "?".
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(specials)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=extra,
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],
        **named,
    )
    tokenizer.chat_template = chat_template
    return tokenizer

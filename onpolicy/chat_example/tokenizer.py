"""A Qwen2-style byte-level BPE tokenizer, trained locally on the example's conversations.

The same recipe as Qwen2's tokenizer, only smaller: the Qwen2 pre-tokenizer regex (every digit
its own token, so a number is spelled digit by digit), byte-level BPE so any text encodes,
no BOS, and the ChatML special tokens with `<|im_end|>` as EOS: a generation stops at the end
of the assistant's turn, as with a real chat model.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [PAD, IM_START, IM_END]
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-0.5B): words with their leading space,
# single digits, punctuation runs, newlines.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML, as Qwen2 writes it, without Qwen's default system prompt: a conversation without a
# system turn renders without one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_chatml(messages: list[dict]) -> str:
    """ChatML text of whole conversations, for training the BPE merges (same layout as CHAT_TEMPLATE)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, max_length: int = 256):
    """A `PreTrainedTokenizerFast` with byte-level BPE merges learnt from `texts` (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )

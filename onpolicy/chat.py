"""Chat templates: the student's template, the check that the teacher would render prompts alike, and the
tokens that end an assistant turn.

The teacher never renders anything: it scores the student's token ids. But a teacher trained on another
template sees those ids as an unfamiliar format, and its log-probs are biased without any error (a known
failure of distillation tools). So before anything starts, a probe conversation is rendered by each
tokenizer with its own template, and the run is refused if the token ids differ, naming the first one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A ChatML template (Qwen's format without its default system prompt), for tokenizers that have none.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# Probes, with and without a system turn (templates that write a default system prompt differ only without).
PROBE_CONVERSATIONS = (
    ({"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 12+34?"},
     {"role": "assistant", "content": "46"}, {"role": "user", "content": "And 5+7?"}),
    ({"role": "user", "content": "What is 12+34?"},),
)


def with_chat_template(tokenizer: Any, template: str = CHATML_TEMPLATE,
                       special_tokens: tuple[str, ...] = CHATML_SPECIAL_TOKENS) -> Any:
    """Give `tokenizer` a chat template, adding the template's markers as special tokens (in place).

    The vocabulary grows by the markers it lacks: resize the model's embeddings to `len(tokenizer)`."""
    missing = [t for t in special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        try:  # keep the tokenizer's other extra special tokens (the keyword's transformers 5 name, then 4's)
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        except TypeError:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer


def load_student_tokenizer(path: str | Path, chat_template_file: str | None = None) -> Any:
    """The student's tokenizer; with `chat_template_file` (data.chat_template), that Jinja template replaces
    the tokenizer's own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if chat_template_file is not None:
        f = Path(chat_template_file)
        if not f.is_file():
            raise FileNotFoundError(f"chat template file not found: {f} (data.chat_template)")
        tokenizer.chat_template = f.read_text(encoding="utf-8")
    return tokenizer


def render_ids(tokenizer: Any, messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> list[int]:
    """The token ids of `messages` rendered with the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer at {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template, so conversations "
            "(data.messages_field) cannot be rendered; set data.chat_template to a Jinja template file"
        )
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def _render_probe(tokenizer: Any, probe: tuple[dict[str, str], ...]) -> list[int] | str:
    """The probe's ids, or the template's error as text (some templates refuse a system turn)."""
    try:
        return render_ids(tokenizer, probe)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - jinja raises its own errors (e.g. raise_exception in the template)
        return f"{type(err).__name__}: {err}"


def compare_chat_templates(student: Any, teacher: Any) -> str | None:
    """None when both tokenizers render the probe conversations to the same token ids, else a message
    naming the first differing token (its position, and the token each side has there, decoded)."""
    if not getattr(teacher, "chat_template", None):
        return (f"the teacher's tokenizer ({getattr(teacher, 'name_or_path', '?')}) has no chat template, so it "
                "was not trained on the student's chat format; give the teacher folder the student's template, or "
                "set data.check_chat_template=false if this is intended")
    for probe in PROBE_CONVERSATIONS:
        s_ids, t_ids = _render_probe(student, probe), _render_probe(teacher, probe)
        if s_ids != t_ids:
            break
    else:
        return None
    if isinstance(s_ids, str) or isinstance(t_ids, str):
        return (f"the student's and the teacher's chat templates disagree on a probe conversation: student "
                f"{s_ids if isinstance(s_ids, str) else 'renders it'}, teacher "
                f"{t_ids if isinstance(t_ids, str) else 'renders it'}")
    pos = next((i for i, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))

    def show(tokenizer: Any, ids: list[int]) -> str:
        if pos >= len(ids):
            return "(the end of the prompt)"
        return f"{tokenizer.decode([ids[pos]])!r} (id {ids[pos]})"

    return (
        f"the student's and the teacher's chat templates render a probe conversation differently: first "
        f"difference at token {pos}: student {show(student, s_ids)}, teacher {show(teacher, t_ids)} (student "
        f"prompt: {student.decode(s_ids)!r}). The teacher would score the student's prompts in a format it was "
        "not trained on. Use models with the same template, point data.chat_template at the teacher's template, "
        "or set data.check_chat_template=false to run anyway."
    )


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token(s) the template writes right after an assistant's message (e.g. `<|im_end|>`,
    `<|eot_id|>`): found by rendering a conversation that ends with an assistant turn. [] if none is found."""
    user = [{"role": "user", "content": "1"}]
    try:
        prefix = render_ids(tokenizer, user)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "2"}], tokenize=True,
                                             return_dict=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no end-of-turn to find
        return []
    full = [int(i) for i in full]
    if full[: len(prefix)] != prefix:
        return []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next(([i] for i in full[len(prefix):] if i in special), [])


def stop_token_ids(tokenizer: Any, stop_tokens: list[str] | None, chat: bool) -> list[int]:
    """Token ids that end a completion: EOS plus `stop_tokens` (rollout.stop_tokens), or when that is None
    and prompts are conversations, the template's end-of-turn token. Each named token must be one token."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if stop_tokens is None:
        extra = end_of_turn_ids(tokenizer) if chat else []
    else:
        vocab = tokenizer.get_vocab()
        unknown = [t for t in stop_tokens if t not in vocab]
        if unknown:
            raise ValueError(f"rollout.stop_tokens: {unknown} are not tokens of the student's vocabulary (each "
                             "entry must be one token, e.g. <|im_end|>)")
        extra = [int(vocab[t]) for t in stop_tokens]
    return sorted(set(ids + extra))

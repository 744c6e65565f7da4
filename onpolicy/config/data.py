"""The `data` section: where prompts come from, one member per `data.task`."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from onpolicy.config.base import Kinds, Section, path_marker


class _DataBase(Section):
    skip_long_prompts: bool = Field(
        False,
        description="Drop (and count) prompts longer than the student's or teacher's max length minus "
        "rollout.max_new_tokens, instead of refusing the run before it starts.",
    )


class _PlainTextData(_DataBase):
    # Plain-text prompts are tokenized as they are, never rendered with a chat template: these two are facts
    # of the task, not settings, and readers of `data.chat_template` need not ask which task they hold.
    chat_template: ClassVar[None] = None
    check_chat_template: ClassVar[bool] = False


class AdditionDataConfig(_PlainTextData):
    """The embedded toy task: `a+b=` prompts, exact-match answers, a longer out-of-distribution split."""

    task: Literal["addition"] = Field("addition", description="`addition`: the embedded toy task.")
    min_digits: int = Field(1, ge=1, le=9, description="Fewest digits per training operand.")
    max_digits: int = Field(3, ge=1, le=9, description="Most digits per training operand.")
    ood_digits: int = Field(4, ge=1, le=12, description="Digits per operand in the out-of-distribution split.")

    @model_validator(mode="after")
    def _check_digits(self) -> AdditionDataConfig:
        if self.min_digits > self.max_digits:
            raise ValueError("data.min_digits must be <= data.max_digits")
        return self


class JsonlDataConfig(_PlainTextData):
    task: Literal["jsonl"] = Field(
        "jsonl", description="`jsonl`: prompts from a file of {prompt, answer?, split?} lines."
    )
    prompts_path: str = Field(
        min_length=1, description="A file of {\"prompt\": ..., \"answer\"?: ..., \"split\"?: train|heldout|ood} lines.",
        json_schema_extra=path_marker("data"),
    )


class DatasetDataConfig(_DataBase):
    task: Literal["dataset"] = Field(
        "dataset", description="`dataset`: any source the `datasets` library reads (see `source`)."
    )
    source: str = Field(
        min_length=1,
        description="A local .jsonl/.json/.parquet/.csv file, a dataset folder (save_to_disk, or data files per "
        "split), or a Hugging Face hub id (needs the network or the hub cache).",
        json_schema_extra=path_marker("data_or_hub"),
    )
    prompt_field: str | None = Field(None, description="The column holding plain-text prompts.")
    messages_field: str | None = Field(
        None,
        description="The column holding chat conversations ([{role, content}], OpenAI style); a final assistant "
        "turn is dropped and the rest rendered with the student's chat template.",
    )
    answer_field: str | None = Field(
        None, description="The column with the expected answer (exact-match eval; null: not reported)."
    )
    split: str = Field("train", min_length=1, description="The split trained on.")
    heldout_split: str | None = Field(
        None, description="The split evaluated on (null: hold out `heldout_fraction` of `split`)."
    )
    heldout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Without heldout_split: this fraction of `split` is held out (the same rows whatever the run "
        "seed; eval uses at most eval.num_prompts of them). Streaming: any value > 0 holds out the first "
        "eval.num_prompts rows. 0: no held-out set.",
    )
    streaming: bool = Field(
        False,
        description="Read the split as a stream (large sets): shuffled in a buffer with the run seed, rows checked "
        "as they are read instead of all before the run starts.",
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat-template file to use instead of the student tokenizer's own.",
        json_schema_extra=path_marker("data"),
    )
    check_chat_template: bool = Field(
        True,
        description="Before anything starts, render a probe conversation with the student's template and a local "
        "teacher's own and refuse the run if their token ids differ.",
    )

    @model_validator(mode="after")
    def _check_fields(self) -> DatasetDataConfig:
        if (self.prompt_field is None) == (self.messages_field is None):
            raise ValueError("task=dataset needs exactly one of data.prompt_field (plain text) or "
                             "data.messages_field (chat conversations)")
        return self


DataConfig = Annotated[AdditionDataConfig | JsonlDataConfig | DatasetDataConfig, Field(discriminator="task")]
DATA_KINDS = Kinds.of("data", DataConfig, default="addition")

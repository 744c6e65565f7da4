"""The `data` section: where prompts come from, one member per `data.task`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

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
    unseen_digits: int | None = Field(
        None, ge=1, le=12,
        description="Digits per operand in the `unseen` split, a length neither the teacher nor the student was "
        "trained on (the toy's: 5); evaluated beside the OOD split (null: no unseen split).",
    )

    @model_validator(mode="after")
    def _check_digits(self) -> AdditionDataConfig:
        _check_digit_range(self.min_digits, self.max_digits)
        return self


def _check_digit_range(min_digits: int, max_digits: int) -> None:
    if min_digits > max_digits:
        raise ValueError("data.min_digits must be <= data.max_digits")


class WorkingDataConfig(_PlainTextData):
    """The second embedded task: column arithmetic with the working written out (`4821+377=` ->
    `1+7+0=08,2+7+0=09,...|8915`, ~10 tokens a column), where one early mistake derails every column after it."""

    task: Literal["working"] = Field(
        "working", description="`working`: column arithmetic with the working written out (onpolicy/working)."
    )
    operation: Literal["add", "subtract"] = Field("add", description="`add` (carries) or `subtract` (borrows).")
    min_digits: int = Field(5, ge=1, le=9, description="Fewest digits per training operand.")
    max_digits: int = Field(6, ge=1, le=9, description="Most digits per training operand (answers ~10 tokens a digit).")
    ood_digits: int = Field(
        7, ge=1, le=12, description="Digits per operand in the OOD split (the shipped teacher learnt 7, the student not)."
    )
    unseen_digits: int | None = Field(
        8, ge=1, le=12,
        description="Digits per operand in the `unseen` split, a length no shipped model was trained on (null: none).",
    )

    @model_validator(mode="after")
    def _check_digits(self) -> WorkingDataConfig:
        _check_digit_range(self.min_digits, self.max_digits)
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


# The prompt sources of one kind each; a mixture (below) is a weighted list of them.
_SOURCE_MEMBERS = (AdditionDataConfig, WorkingDataConfig, JsonlDataConfig, DatasetDataConfig)
# The embedded tasks: the ones `onpolicy toy build --task` makes models for.
EMBEDDED_TASKS = tuple(m.model_fields["task"].default for m in (AdditionDataConfig, WorkingDataConfig))
SourceDataConfig = Annotated[Union[_SOURCE_MEMBERS], Field(discriminator="task")]  # noqa: UP007  # a tuple of members
_NAME = r"^[A-Za-z0-9_-]+$"


class SourceConfig(Section):
    """One source of a mixture: its prompts, its share of every batch, and the teacher its prompts go to."""

    name: str = Field(min_length=1, max_length=64, pattern=_NAME,
                      description="The source's name: its metrics are `source_<name>_...`.")
    weight: float = Field(gt=0.0, le=1e6, description="Its share of each batch: weight / the sum of the weights.")
    teacher: str = Field(
        "teacher", min_length=1, max_length=64, pattern=_NAME,
        description="The name of the teacher that scores (or samples) this source's prompts: one of `teachers:` "
        "(`self`: the frozen starting student), or `teacher` for the run's one `teacher:` section.",
    )
    data: SourceDataConfig = Field(
        default_factory=AdditionDataConfig,
        description="Where its prompts come from: any `data` section but a mixture (default: the toy task).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "task" not in data["data"]:
            data = {**data, "data": {"task": "addition", **data["data"]}}
        return data


class MixtureDataConfig(Section):
    """Prompts from several sources, each batch drawn from them by weight, each prompt going to its source's
    teacher; metrics and held-out evaluation per source."""

    task: Literal["mixture"] = Field(
        "mixture", description="`mixture`: a weighted mixture of sources, each routed to a named teacher."
    )
    sources: list[SourceConfig] = Field(min_length=1, max_length=32, description="The sources of the mixture.")

    @model_validator(mode="after")
    def _check_sources(self) -> MixtureDataConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: each source needs its own name (got {names})")
        templates = {s.data.chat_template for s in self.sources if s.data.chat_template is not None}
        if len(templates) > 1:
            raise ValueError("data.sources: the conversations of every source are rendered with one chat template: "
                             "give at most one data.chat_template")
        return self

    @property
    def chat_template(self) -> str | None:
        """The template file one of the sources names (the sources may name one between them)."""
        return next((s.data.chat_template for s in self.sources if s.data.chat_template is not None), None)

    @property
    def check_chat_template(self) -> bool:
        return any(s.data.check_chat_template for s in self.sources)


DataConfig = Annotated[Union[(*_SOURCE_MEMBERS, MixtureDataConfig)], Field(discriminator="task")]
DATA_KINDS = Kinds.of("data", DataConfig, default="addition")

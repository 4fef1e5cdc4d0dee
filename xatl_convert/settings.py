"""One settings model per command that trains or scores: the CLI parses options into it, the library takes it.

A bad value is one line that names the option as the user typed it (`--kd-steps -2: …`), before any model loads.
The models are frozen pydantic models with forbidden extras, so a typo in a keyword is an error too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xatl_convert.errors import XatlError

SEED_LIMIT = 2**32  # numpy's seed, which the HF Trainer sets, takes no more
Steps = Annotated[int, Field(ge=0)]  # 0 skips a stage, and is recorded as 0
Count = Annotated[int, Field(ge=1)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class SettingsError(XatlError):
    """An option value that cannot run: out of range, not finite, or inconsistent with another option."""


class CommandSettings(BaseModel):
    """Base of every command's settings: frozen, no unknown keys, errors named by their option."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_options(cls, **values: Any):
        """The settings from option values, or one SettingsError naming the first bad option."""
        try:
            return cls(**values)
        except ValidationError as error:
            raise SettingsError(_first_problem(error, values)) from None


def _first_problem(error: ValidationError, values: dict[str, Any]) -> str:
    problem = error.errors()[0]
    field = str(problem["loc"][0]) if problem["loc"] else ""
    message = problem["msg"].removeprefix("Value error, ")
    if not field:
        return message
    option = "--" + field.replace("_", "-")
    shown = values.get(field, problem.get("input"))
    return f"{option} {shown}: {message[:1].lower()}{message[1:]}"


class DistillSettings(CommandSettings):
    """Every knob of a distillation run, recorded as is in the manifest."""

    align_steps: Steps = 100
    kd_steps: Steps = 100
    batch_size: Count = 4  # blocks per optimiser step, over all processes and accumulation steps
    grad_accum: Count = 1
    block_size: Annotated[int, Field(ge=2)] = 256
    align_lr: Rate = 1e-2  # peak; cosine decay to a tenth over the stage
    align_w_o: bool = True  # align fits the transferred W_O (the mixers' out_proj) with the rest of each mixer
    # The last share of align's steps fits each LCI block's output (its residual update, MLP included) to the
    # teacher block's, from the teacher's input to that block (MOHAWK's stage 2), instead of the mixer's output.
    align_block_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    kd_lr: Rate = 1e-4
    unfreeze_lr: Rate = 1e-4
    temperature: Rate = 1.0
    ce_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    freeze: bool = True  # transferred weights frozen until LIT (XATL); False trains every weight from the start
    lit_preset: str = "paper-1pct"
    lit_window: Count = 20
    mix_data: str | None = None  # other text mixed into the training blocks (never into the held-out split)
    mix_share: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.25  # of the training blocks
    held_out: Annotated[float, Field(gt=0, lt=1)] = 0.05
    eval_blocks: Count = 32  # as `xatl eval --max-blocks`, so that eval's gap uses the same blocks
    eval_every: Steps = 0  # steps between held-out evaluations for the curve (0: start and end only)
    save_every: Steps = 0  # steps between checkpoints (0: none)
    seed: Seed = 0
    # Stage kd reads the teacher's top-k log-probabilities from this folder (built first if missing) instead of
    # running the teacher at every step; see training.teacher_cache.
    teacher_cache: str | None = None
    teacher_top_k: Count = 64

    @model_validator(mode="before")
    @classmethod
    def _tokens_to_steps(cls, values: Any) -> Any:
        """`align_tokens`/`kd_tokens` (the CLI's --align-tokens, --kd-tokens) become steps, rounded up."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        tokens_per_step = _positive(values.get("batch_size", 4)) * _positive(values.get("block_size", 256))
        for stage in ("align", "kd"):
            tokens = values.pop(f"{stage}_tokens", None)
            if tokens is None:
                continue
            if not isinstance(tokens, int) or tokens < 0:
                raise ValueError(f"--{stage}-tokens {tokens}: expected a number of tokens, 0 or more")
            values[f"{stage}_steps"] = -(-tokens // tokens_per_step) if tokens_per_step else 0
        return values

    @field_validator("lit_preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        from xatl_convert.training.lit import LossImprovementThreshold

        LossImprovementThreshold.preset(name)  # its ValueError names the presets
        return name

    @model_validator(mode="after")
    def _accumulation_divides_batch(self) -> DistillSettings:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"--grad-accum {self.grad_accum} does not divide --batch-size {self.batch_size}; "
                "choose a batch that is a multiple of it"
            )
        return self

    @model_validator(mode="after")
    def _teacher_cache_at_temperature_one(self) -> DistillSettings:
        if self.teacher_cache is not None and self.temperature != 1:
            raise ValueError(
                f"--temperature {self.temperature} with --teacher-cache: the cache holds the teacher's "
                "log-probabilities at temperature 1 only; leave out one of the two"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The settings as a run's checkpoints record them: without the teacher-cache options when no cache is used,
        so that checkpoints written before those options existed still resume."""
        unused = {"teacher_cache", "teacher_top_k"} if self.teacher_cache is None else set()
        return self.model_dump(exclude=unused)

    def per_process_batch(self, processes: int) -> int:
        """Blocks in one forward of one process; the global batch must split evenly."""
        parts = processes * self.grad_accum
        if self.batch_size % parts:
            raise SettingsError(
                f"--batch-size {self.batch_size} does not split over {processes} process(es) × --grad-accum "
                f"{self.grad_accum}; choose a multiple of {parts}"
            )
        return self.batch_size // parts

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


class EvalSettings(CommandSettings):
    """What `xatl eval` scores: block size, how many blocks, the batch, and which split."""

    block_size: Annotated[int, Field(ge=2)] = 256
    max_blocks: Count = 32
    batch_size: Count = 4
    split: Literal["held-out", "all"] = "held-out"


SCORE_SHARE = 8  # layer selection scores on 1/8 of its budget (at least one block); align gets the rest


class LayerSelectionSettings(CommandSettings):
    """What `--attn-layers auto:K` and `xatl select-layers` measure: how many layers to keep, the token budget, and
    the brief align that comes before the measurement."""

    keep: Count
    select_tokens: Annotated[int, Field(ge=2)] = 16384
    block_size: Annotated[int, Field(ge=2)] = 256
    batch_size: Count = 1  # blocks per align step: more, smaller steps move the new mixers further on a small budget
    align_lr: Rate = 1e-2
    held_out: Annotated[float, Field(gt=0, lt=1)] = 0.05  # as distill's, so selection never reads its held-out text
    shortlist: Count = 8  # greedy picks after the first are re-measured among this many best single layers (≥ keep)
    seed: Seed = 0

    @model_validator(mode="after")
    def _budget_covers_one_step(self) -> LayerSelectionSettings:
        least = self.block_size * (self.batch_size + 1)
        if self.align_steps < 1:
            raise ValueError(
                f"--select-tokens {self.select_tokens}: too few to align once and score once; give at least {least} "
                f"({self.batch_size} block(s) of {self.block_size} tokens to align, one to score)"
            )
        return self

    @property
    def score_blocks(self) -> int:
        """Blocks the restorations are scored on: 1/8 of the budget, at least one."""
        return max(1, self.select_tokens // SCORE_SHARE // self.block_size)

    @property
    def align_steps(self) -> int:
        """Align steps in what the scoring leaves of the budget."""
        return (self.select_tokens - self.score_blocks * self.block_size) // (self.batch_size * self.block_size)


def _positive(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0

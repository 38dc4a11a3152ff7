"""What happened to the data rows (DataReport) and why an example was left out or cut (the reasons, its keys)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_BAD_ROW_SAMPLES = 10

# Drop reasons, also the keys of DataReport.dropped.
TOO_LONG = "too long"
NO_ROOM = "prompt leaves no room for the response"
SHORT_AFTER_TRUNCATION = "response shorter than min_response_tokens after truncation"
NO_TARGETS = "no response tokens"
SPECIAL_TEXT = "text contains a special token"
EMPTY_TURN = "assistant turn renders to no tokens"
BOUNDARY_MERGE = "tokens merge across a turn boundary"
REPLY_CHANGED = "reply tokens change when the oldest turns are cut"

# What was cut from kept examples, the key of DataReport.truncated.
PROMPT_TRUNCATED = "prompt cut to its final turns"
RESPONSE_TRUNCATED = "response cut at data.max_length"


class DropExample(Exception):
    """A well-formed conversation that cannot become a training example (counted per reason, not fatal)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataReport:
    """What happened to the rows: read, rejected as malformed, dropped (per reason), kept, and kept with a cut."""

    rows_read: int = 0
    bad_rows: int = 0
    bad_row_samples: list[str] = field(default_factory=list)  # "location: reason", the first few
    dropped: dict[str, int] = field(default_factory=dict)  # training rows/examples left out, per reason
    eval_dropped: dict[str, int] = field(default_factory=dict)
    train_examples: int = 0
    eval_examples: int = 0
    truncated: dict[str, int] = field(default_factory=dict)  # training examples kept with a cut, per what was cut
    eval_truncated: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line of counts, plus a line of drop reasons and one of truncations when there are any."""
        line = f"data: {self.rows_read} rows read -> {self.train_examples} train / {self.eval_examples} eval examples"
        if self.bad_rows:
            line += f"; {self.bad_rows} bad rows skipped (e.g. {self.bad_row_samples[0]})"
        sections = (("dropped", self.dropped, self.eval_dropped), ("truncated", self.truncated, self.eval_truncated))
        for name, train, evals in sections:
            counts = {**train, **{f"{reason} (eval)": n for reason, n in evals.items()}}
            if counts:
                line += f"\n{name}: " + ", ".join(f"{reason} x{n}" for reason, n in sorted(counts.items()))
        return line

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

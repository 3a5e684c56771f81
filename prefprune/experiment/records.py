"""The typed records of an experiment: which retrain (an :class:`Arm`) and what it measured
(a :class:`RunRecord`), saved one JSON file per retrain so an experiment resumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from prefprune.pruning import PruneConfig


@dataclass(frozen=True)
class Arm:
    """One retrain: which pairs a method picks, how many, and what is done to them."""

    seed: int
    method: str | None = None  # None: the unpruned baseline
    fraction: float = 0.0
    direction: str = "harmful"
    action: str = "remove"

    @property
    def key(self) -> str:
        """File stem of the arm's record, unique within an experiment."""
        if self.method is None:
            return f"seed{self.seed}-base"
        return (f"seed{self.seed}-{self.method}-{self.direction}-{self.action}-"
                f"{self.fraction:g}")

    @property
    def group(self) -> str:
        """The comparison this arm belongs to (e.g. ``remove harmful``)."""
        return "baseline" if self.method is None else f"{self.action} {self.direction}"

    @property
    def shape(self) -> tuple[str | None, float, str, str]:
        """The arm without its seed: what is compared across seeds."""
        return (self.method, self.fraction, self.direction, self.action)

    def prune_config(self) -> PruneConfig:
        """The pairs this arm acts on, as ``prefprune prune`` would select them."""
        assert self.method is not None, "the baseline prunes nothing"
        return PruneConfig(by=self.method, fraction=self.fraction, direction=self.direction,
                           relabel=self.action == "relabel")

    def with_method(self, method: str | None) -> Arm:
        return replace(self, method=method) if method else Arm(self.seed)


@dataclass(frozen=True)
class RunRecord:
    """What one (re)training measured, with the fingerprint of the pairs it trained on."""

    arm: Arm
    train_pairs: int
    pairs_affected: int
    flipped_share_of_affected: float | None
    test_accuracy: float
    test_loss: float
    final_train_loss: float
    seconds: float
    train_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON: the arm's fields, its key and group, then the measurements."""
        out = {**asdict(self.arm), "key": self.arm.key, "group": self.arm.group}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "arm"})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        arm = Arm(**{f.name: data[f.name] for f in fields(Arm)})
        values = {f.name: data[f.name] for f in fields(cls) if f.name != "arm" and f.name in data}
        return cls(arm=arm, **values)

"""How to read a source: layout, column mapping, strictness and hub coordinates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prefprune.config import Settings, setting
from prefprune.data.formats import CONVERTERS, MAPPABLE
from prefprune.data.pairwise import label_text
from prefprune.errors import ConfigError

#: Layouts a source can be read as; ``auto`` detects it from the first record.
FORMATS = ("auto", *CONVERTERS)

@dataclass(frozen=True)
class DataOptions(Settings):
    """The reading options of :func:`~prefprune.data.load_preferences`, as one value that
    commands, experiments and the writer share."""

    section: ClassVar[str] = "data_options"

    format: str = setting("auto", choices=FORMATS,
                          help="Input layout; auto detects it from the first record.")
    columns: dict[str, str] = setting(
        default_factory=dict, metavar="CANONICAL=COLUMN",
        help="Map a canonical column (id, prompt, chosen, rejected) to yours as "
             "CANONICAL=COLUMN, e.g. --column prompt=question. Repeatable.")
    strict: bool = setting(
        False, help="Stop at the first bad row instead of skipping and reporting it.")
    hub_config: str | None = setting(None, help="Configuration of a hub dataset (e.g. "
                                                "comparisons).")
    hub_split: str | None = setting(None, help="Only this split of a hub or saved dataset.")
    data_dir: str | None = setting(None, help="data_dir argument of a hub dataset.")
    hub: bool = setting(False, help="Read DATA as a hub dataset name. Without it only names "
                                    "shaped like owner/name go to the hub.")
    label_values: tuple[str, str] | None = setting(
        None, metavar="A,B",
        help="How an A/B layout's label names the preferred answer: the value meaning A, then "
             "the one meaning B (e.g. --label-values=-1,1); negative,positive reads a signed "
             "strength by its sign. Default: 0/a/A/model_a and 1/b/B/model_b.")

    def validate(self) -> None:
        """A mapping must name canonical columns, and the two label values must differ: equal
        ones would read every label as A."""
        for canonical, column in self.columns.items():
            if canonical not in MAPPABLE:
                raise ConfigError("columns", f"'{canonical}' is not a canonical column; "
                                             f"mappable ones are {', '.join(MAPPABLE)}")
            if not isinstance(column, str) or not column:
                raise ConfigError("columns", f"'{canonical}' must map to a column name")
        if self.label_values and len({label_text(v) for v in self.label_values}) == 1:
            raise ConfigError("label_values", f"the value meaning A and the one meaning B must "
                                              f"differ, got {','.join(self.label_values)}")

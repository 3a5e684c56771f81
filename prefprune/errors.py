"""Every error and warning prefprune raises for a user to act on.

One base class, :class:`PrefpruneError`, marks "the input, a setting or a file is wrong; the
message says what to change". The command line prints any of them as one red ``error:`` line;
anything else that escapes is a bug in prefprune and keeps its traceback. The subclasses only
say which stage complained, so a Python caller can catch ``DataError`` apart from
``ModelError``. Warnings follow scikit-learn's habit: a run that finishes but should not be
trusted blindly (an unconverged solve, a model trained on other data) warns with a
:class:`PrefpruneWarning` subclass instead of failing.
"""

from __future__ import annotations


class PrefpruneError(Exception):
    """Base of every user-facing error: bad input, bad setting, or a file that must not be
    touched. The message names the file, row or setting, and what to do."""


class ConfigError(PrefpruneError, ValueError):
    """A setting has the wrong type or is out of range; ``field`` is its dotted name."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)

    def within(self, section: str) -> ConfigError:
        """The same error for a field of the nested ``section`` (``epochs`` -> ``train.epochs``)."""
        return type(self)(f"{section}.{self.field}" if self.field else section, self.problem)


class DataError(PrefpruneError, ValueError):
    """Input data that cannot be used; the message names file, line/row and field."""


class ModelError(PrefpruneError):
    """A reward model cannot be built, loaded or saved; the message says which path and why."""


class InfluenceError(PrefpruneError):
    """A scoring request cannot be carried out; the message says why and what to change."""


class InfluenceConfigError(ConfigError, InfluenceError):
    """An :class:`~prefprune.influence.config.InfluenceConfig` setting is invalid."""


class NegativeCurvatureError(InfluenceError):
    """CG found a direction ``p`` with ``pᵀ(H + λI)p <= 0``: the damped Hessian is not PD.

    CG minimises a quadratic that has no minimum in that case, so its iterate is meaningless;
    raise the damping or use the (positive semi-definite) Gauss–Newton curvature.
    """

    def __init__(self, message: str, *, iteration: int, curvature: float) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.curvature = curvature


class GradientError(InfluenceError):
    """The model has trainable parameters that the batched path cannot attribute per pair."""


class SelectionError(PrefpruneError, ValueError):
    """A selection request does not fit the score table; the message says what to change."""


class ExperimentError(PrefpruneError, ValueError):
    """An experiment cannot run as configured, or its folder holds another experiment."""


class ExperimentConfigError(ConfigError, ExperimentError):
    """An :class:`~prefprune.experiment.config.ExperimentConfig` setting is invalid."""


class OutputError(PrefpruneError):
    """Writing the output would delete or overwrite something prefprune must not touch."""


class PrefpruneWarning(UserWarning):
    """A run finished, but something about it deserves the user's attention."""


class ConvergenceWarning(PrefpruneWarning):
    """An iterative inverse-Hessian solve stopped before reaching its tolerance."""


class StaleDataWarning(PrefpruneWarning):
    """A model or score table was made from other data than the data it is used with."""

"""The study's public names: tasks, EHR representations and fusion strategies.

This module is the one place where the names are declared; the notebooks check their
parameters against it and the grid runner (``helpers.study``) builds the grid from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Task",
    "TASKS",
    "EHR_REPRS",
    "FUSIONS",
    "UNIMODAL_IMAGE",
    "ParameterError",
    "check_choice",
    "get_task",
]


class ParameterError(ValueError):
    """A notebook or command parameter has a value outside its allowed set."""


@dataclass(frozen=True)
class Task:
    """A time-to-event task.

    ``horizon_days`` is the follow-up at which survival probabilities are reported and at which
    follow-up is administratively censored; ``window_hu`` is the CT intensity window (HU) from
    the paper; ``outcome_groups`` are the vocabulary groups (see ``helpers.vocabulary``) whose
    first occurrence after the index CT is the event, besides death where ``death_is_event``.
    """

    name: str
    title: str
    horizon_days: int
    window_hu: tuple[float, float]
    index_procedure_group: str
    outcome_groups: tuple[str, ...]
    death_is_event: bool


TASKS: dict[str, Task] = {
    "pe": Task(
        name="pe",
        title="Mortality after pulmonary embolism",
        horizon_days=365,
        window_hu=(-1350.0, 150.0),
        index_procedure_group="ctpa",
        outcome_groups=(),
        death_is_event=True,
    ),
    "mace": Task(
        name="mace",
        title="Major adverse cardiac events",
        # The paper does not state the MACE follow-up; 5 years is the horizon of the
        # PREVENT-style risk scores it cites.
        horizon_days=1825,
        window_hu=(-125.0, 225.0),
        index_procedure_group="ct_chest",
        outcome_groups=("mi", "stroke", "heart_failure"),
        # Any death counts: the twin, like most OMOP extracts, records no cause of death
        # reliably enough to separate cardiac from other deaths.
        death_is_event=True,
    ),
}

EHR_REPRS: tuple[str, ...] = ("onehot", "clmbr")

FUSIONS: tuple[str, ...] = (
    "image_only",
    "ehr_only",
    "concat",
    "contrastive",
    "cross_attention",
    "coattn_ehr_guided",
    "coattn_image_guided",
)

# image_only does not use an EHR representation; its runs live under this ehr_repr name.
UNIMODAL_IMAGE = "none"


def check_choice(name: str, value: object, allowed: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ``ParameterError`` naming it.

    >>> check_choice("task", "pe", tuple(TASKS))
    'pe'
    >>> check_choice("fusion", "late", FUSIONS)
    Traceback (most recent call last):
    ...
    helpers.tasks.ParameterError: parameter 'fusion': unknown value 'late'; expected one of image_only, ehr_only, concat, contrastive, cross_attention, coattn_ehr_guided, coattn_image_guided
    """
    if value not in allowed:
        raise ParameterError(
            f"parameter {name!r}: unknown value {value!r}; expected one of {', '.join(allowed)}"
        )
    return str(value)


def get_task(name: str) -> Task:
    """The ``Task`` called ``name`` (``pe`` or ``mace``), or ``ParameterError``."""
    return TASKS[check_choice("task", name, tuple(TASKS))]

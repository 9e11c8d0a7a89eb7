"""Filters for the review gallery's detail panel."""

from django import template

from apps.analysis.review import second_choice as second_choice_of

register = template.Library()


@register.filter
def second_choice(path: list[dict]) -> dict | None:
    """The runner-up of the closest decision on a cell's path (see review.second_choice)."""
    return second_choice_of(path)


@register.filter
def percent(probability: float | None) -> str:
    """0.873 → '87'; empty when there is no probability."""
    return "" if probability is None else f"{100 * probability:.0f}"

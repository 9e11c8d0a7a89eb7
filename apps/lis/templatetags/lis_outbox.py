from django import template

from apps.lis.outbox import outbox_state

register = template.Library()


@register.simple_tag
def lis_outbox_state(run) -> dict:
    """`{% lis_outbox_state run as lis %}`: the run's LIS messages and whether it can be queued."""
    return outbox_state(run)

"""The run page's LIS outbox: its messages' states (polled while one is on its way) and Send again."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from apps.accounts.roles import lab_staff_required
from apps.analysis.services import runs_for

from . import outbox


@lab_staff_required
def run_outbox(request, pk: int):
    run = get_object_or_404(runs_for(request.user), pk=pk)
    return render(request, "lis/_outbox.html", {"run": run})


@require_POST
@lab_staff_required
def send_again(request, pk: int):
    run = get_object_or_404(runs_for(request.user), pk=pk)
    try:
        message = outbox.queue_again(run_id=run.pk)
    except outbox.OutboxError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"Message {message.control_id} is queued for {message.connection.name}; it is "
                                  "sent within a minute.")
    return redirect("analysis:run", pk=run.pk)

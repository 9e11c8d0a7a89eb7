from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from apps.accounts.roles import curator_required, is_curator, lab_staff_required

from . import services
from .adaptation import AdaptationError, start_adaptation
from .charts import confusion_rows, loss_curves
from .forms import SUGGESTED_ARCHITECTURES, TrainingForm
from .models import TrainingJob


def _render(request, template: str, context: dict, partials: tuple[str, ...] = ()):
    """The full page, or only the named partial when htmx targets it."""
    target = request.htmx.target if request.htmx else None
    if target in partials:
        return render(request, f"{template}#{target}", context)
    return render(request, template, context)


@lab_staff_required
def home(request):
    services.detect_lost_jobs()
    jobs = TrainingJob.objects.select_related("dataset", "result")[:100]
    return _render(request, "training/home.html", {"jobs": jobs}, ("job-list",))


@curator_required
def start(request):
    form = TrainingForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            if data.get("adapt_from"):
                job = start_adaptation(dataset=data["dataset"], from_set=data["adapt_from"], name=data["name"],
                                       mode=data.get("adapt_mode") or "heads", user=request.user)
            else:
                job = services.start_training(dataset=data["dataset"], name=data["name"],
                                              params=services.job_params_from_form(data), user=request.user)
        except (services.TrainingRequestError, AdaptationError) as error:
            form.add_error(None, str(error))
        else:
            messages.success(request, f"Training {job.name} queued.")
            return redirect("training:job", pk=job.pk)
    return render(request, "training/start.html", {"form": form, "architectures": SUGGESTED_ARCHITECTURES})


@lab_staff_required
def job(request, pk: int):
    services.detect_lost_jobs()
    job = get_object_or_404(TrainingJob.objects.select_related("dataset", "result"), pk=pk)
    nodes = []
    if job.result:
        for model in job.result.node_models.select_related("node").order_by("node__order"):
            test = model.metrics.get("test", {})
            nodes.append({"model": model, "test": test, "confusion": confusion_rows(test.get("confusion", {})),
                          "columns": test.get("confusion", {}).get("columns", [])})
    context = {"job": job, "charts": loss_curves(job.metrics.get("history", {})), "nodes": nodes,
               "can_manage": is_curator(request.user), "queue_hint": services.queue_hint(job)}
    return _render(request, "training/job.html", context, ("job-progress",))


@require_POST
@curator_required
def cancel(request, pk: int):
    job = get_object_or_404(TrainingJob, pk=pk)
    try:
        services.cancel_job(job)
        messages.success(request, "Cancelling: the job stops at its next progress report.")
    except services.TrainingRequestError as error:
        messages.error(request, str(error))
    return redirect("training:job", pk=pk)


@require_POST
@curator_required
def resume(request, pk: int):
    job = get_object_or_404(TrainingJob, pk=pk)
    try:
        services.resume_job(job)
        messages.success(request, "Resumed: the job continues from its last checkpoint.")
    except services.TrainingRequestError as error:
        messages.error(request, str(error))
    return redirect("training:job", pk=pk)


@lab_staff_required
def compare(request):
    return render(request, "training/compare.html", {"table": services.comparison_table(),
                                                     "can_manage": is_curator(request.user)})

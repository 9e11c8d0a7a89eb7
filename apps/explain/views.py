"""The explanation page: choose model, image, method; the result appears (and polls while it runs)."""

from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from apps.accounts.roles import lab_staff_required
from hemoweb.ml.explain import ExplainError

from .forms import ExplainForm
from .models import Explanation
from .services import (
    as_id,
    classified_cell,
    decision_of,
    default_model,
    model_classes,
    request_explanation,
    typical_seconds,
)


def _recent():
    return Explanation.objects.select_related("model", "cell").order_by("-created")[:12]


@lab_staff_required
@require_http_methods(["GET", "POST"])
def home(request):
    context = {"recent": _recent()}
    if request.method == "POST":
        form = ExplainForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            upload = data["image"].read() if data.get("image") else None
            try:
                outcome = request_explanation(
                    model=data["model"], method=data["method"], settings_=form.method_settings(),
                    target=data["target"], cell=data["cell"] if not upload else None, upload=upload,
                    classified=data["classified"] if not upload and not data["cell"] else None, user=request.user,
                )
            except ExplainError as error:
                context["error"] = str(error)
            else:
                if not request.htmx:
                    return redirect("explain:result", pk=outcome.explanation.pk)
                context.update(explanation=outcome.explanation, outcome=outcome)
        else:
            context["error"] = " ".join(message for messages in form.errors.values() for message in messages)
        if request.htmx:
            return render(request, "explain/home.html#result", context)
    else:
        model, target = default_model(), ""
        classified = classified_cell(request.GET.get("classified"))
        if classified is not None:  # "Explain" on a result cell: the decision taken last for it
            decided, target = decision_of(classified)
            model = decided or model
            context["classified"] = classified
        initial = {"model": as_id(request.GET.get("model")) or (model.pk if model else None),
                   "cell": as_id(request.GET.get("cell")), "method": request.GET.get("method") or "gradcam",
                   "classified": classified.pk if classified else None, "target": target}
        form = ExplainForm(initial=initial)
    chosen = as_id(form["model"].value())
    classes = []
    if chosen:
        model = form.fields["model"].queryset.filter(pk=chosen).first()
        classes = model_classes(model) if model else []
    context.update(form=form, classes=classes, timings=typical_seconds(model if chosen else default_model()))
    return render(request, "explain/home.html", context)


@lab_staff_required
def result(request, pk: int):
    explanation = get_object_or_404(Explanation.objects.select_related("model", "cell"), pk=pk)
    context = {"explanation": explanation}
    if request.htmx:
        return render(request, "explain/home.html#result", context)
    return render(request, "explain/result.html", context)

"""Pages: the sites, a site (its set in use, quality control over time, its studies), a verification study with its
printable report. Everybody with a role reads them; curators start studies and choose a site's set."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from apps.accounts.roles import curator_required, is_curator, lab_staff_required
from apps.training.charts import confusion_rows

from . import services
from .forms import StudyForm, UseSetForm
from .models import Site, VerificationStudy


def _render(request, template: str, context: dict, partials: tuple[str, ...] = (), status: int = 200):
    """The full page, or only the named partial when htmx targets it."""
    target = request.htmx.target if request.htmx else None
    if target in partials:
        return render(request, f"{template}#{target}", context, status=status)
    return render(request, template, context, status=status)


def _study_for(pk: int) -> VerificationStudy:
    study = get_object_or_404(VerificationStudy.objects.select_related("site", "created_by", "model_set"), pk=pk)
    return services.check_worker(study)


@lab_staff_required
def home(request):
    sites = []
    for site in Site.objects.select_related("model_set", "reference_dataset"):
        in_use = site.set_in_use()
        study = services.latest_study(site, in_use)
        sites.append({"site": site, "in_use": in_use, "study": study,
                      "warning": services.routine_warning(site, in_use, study)})
    return render(request, "sites/home.html", {"sites": sites, "mine": services.site_for_user(request.user)})


def _site_context(request, site: Site, **extra) -> dict:
    use = services.routine_use(site)
    context = {"site": site, "use": use, "chart": services.agreement_over_time(site),
               "studies": services.studies_of(site)[:50], "can_manage": is_curator(request.user),
               "study_form": StudyForm(site=site), "use_form": UseSetForm(initial={"model_set": site.model_set_id})}
    context.update(extra)
    return context


@lab_staff_required
def site_detail(request, pk: int):
    site = get_object_or_404(Site.objects.select_related("model_set", "reference_dataset"), pk=pk)
    return render(request, "sites/site.html", _site_context(request, site))


@require_POST
@curator_required
def start_study(request, pk: int):
    site = get_object_or_404(Site, pk=pk)
    form = StudyForm(request.POST, site=site)
    if form.is_valid():
        try:
            study = services.start_study(dataset=form.cleaned_data["dataset"], models=form.cleaned_data["model_set"],
                                         site=site, user=request.user)
        except services.StudyError as error:
            form.add_error(None, str(error))
        else:
            messages.success(request, f"Verification study {study.pk} queued: {study.n_total} cells.")
            return redirect("sites:study", pk=study.pk)
    return render(request, "sites/site.html", _site_context(request, site, study_form=form), status=400)


@require_POST
@curator_required
def use_set(request, pk: int):
    site = get_object_or_404(Site, pk=pk)
    form = UseSetForm(request.POST)
    if not form.is_valid():
        return render(request, "sites/site.html", _site_context(request, site, use_form=form), status=400)
    use = services.use_model_set(site=site, model_set=form.cleaned_data["model_set"], user=request.user)
    name = use.model_set.name if use.model_set else "no set"
    if use.warning:
        messages.warning(request, f"{site.name} now classifies with {name}. {use.warning}")
    else:
        messages.success(request, f"{site.name} now classifies with {name}; it passed its latest study here "
                                  f"(agreement {use.study.agreement:.3f}).")
    if use.queued:
        messages.info(request, f"Verification study {use.queued.pk} of {name} on the reference cells is queued.")
    return redirect("sites:site", pk=site.pk)


@require_POST
@curator_required
def quality_control(request, pk: int):
    site = get_object_or_404(Site, pk=pk)
    try:
        study = services.quality_control(site=site, user=request.user)
    except services.StudyError as error:
        messages.error(request, str(error))
        return redirect("sites:site", pk=site.pk)
    messages.success(request, f"Quality-control study {study.pk} queued.")
    return redirect("sites:study", pk=study.pk)


def _study_context(request, study: VerificationStudy) -> dict:
    results = study.results or {}
    confusion = results.get("confusion", {})
    return {"study": study, "r": results, "confusion": confusion_rows(confusion),
            "columns": confusion.get("columns", []), "can_manage": is_curator(request.user),
            "per_type": [{"code": code, "row": row, "verdict": results.get("verdicts", {}).get(code, {})}
                         for code, row in results.get("per_type", {}).items()]}


@lab_staff_required
def study(request, pk: int):
    return _render(request, "sites/study.html", _study_context(request, _study_for(pk)), ("study-progress",))


@lab_staff_required
def report(request, pk: int):
    return render(request, "sites/report.html", _study_context(request, _study_for(pk)))

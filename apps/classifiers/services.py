"""Writes to the model registry: registering a model set folder, activating it."""

from pathlib import Path

from django.conf import settings
from django.db import transaction

from apps.cells.models import CellType
from hemoweb.ml.weights import ModelFileError, read_card, read_set

from .models import ModelSet, ModelsToCellTypes, ModelsTypes, TrainedModel


class RegistryError(ValueError):
    """A model set cannot be registered: its files or its classes do not fit this tree."""


def _relative_to_models(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(settings.MODELS_DIR.resolve()).as_posix()
    except ValueError:
        return str(path)


@transaction.atomic
def register_model_set(folder: Path | str, *, name: str | None = None, activate: bool = False) -> ModelSet:
    """Record (or refresh) the model set in `folder`: one TrainedModel per node with its outputs."""
    folder = Path(folder)
    if not folder.is_absolute() and not folder.exists():
        folder = settings.MODELS_DIR / folder
    try:
        set_card = read_set(folder)
        cards = {node: read_card(folder / file_name) for node, file_name in set_card.nodes.items()}
    except ModelFileError as error:
        raise RegistryError(str(error)) from error
    types = {node.code: node for node in CellType.objects.all()}
    needed = {card.node for card in cards.values()} | {code for card in cards.values() for code in card.classes}
    unknown = sorted(needed - set(types))
    if unknown:
        raise RegistryError(f"The model set names cell types that are not in the tree: {', '.join(unknown)}.")
    model_set, _ = ModelSet.objects.update_or_create(
        name=name or set_card.name,
        defaults={
            "folder": _relative_to_models(folder),
            "architecture": set_card.architecture,
            "mode": set_card.mode,
            "input_size": set_card.input_size,
            "card": set_card.__dict__,
            "metrics": set_card.metrics,
            "status": ModelSet.Status.READY,
        },
    )
    model_set.node_models.all().delete()
    for node, card in cards.items():
        architecture, _ = ModelsTypes.objects.get_or_create(name=card.architecture)
        model = TrainedModel.objects.create(
            name=f"{model_set.name} · {node}",
            architecture=architecture,
            node=types[node],
            model_set=model_set,
            weights_file=_relative_to_models(folder / set_card.nodes[node]),
            input_size=card.input_size,
            threshold=card.threshold,
            metrics=card.metrics,
            card=card.__dict__,
        )
        ModelsToCellTypes.objects.bulk_create(
            ModelsToCellTypes(model=model, cell_type=types[code], output_index=index)
            for index, code in enumerate(card.classes)
        )
    if activate or not ModelSet.objects.filter(is_active=True).exists():
        model_set.activate()
    return model_set

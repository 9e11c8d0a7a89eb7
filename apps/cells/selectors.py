"""Reads for the tree and dataset pages."""

from django.db.models import Count

from .models import CellType, Dataset, counts_per_node


def tree_with_counts() -> list[dict]:
    """Root nodes as nested dicts {code, name, own, total, kids} in display order."""
    counts = counts_per_node()
    nodes = {
        node.pk: {"code": node.code, "name": node.name, "own": counts[node.pk][0], "total": counts[node.pk][1],
                  "kids": [], "parent": node.parent_id}
        for node in CellType.objects.order_by("order", "code")
    }
    roots = []
    for node in nodes.values():
        (nodes[node["parent"]]["kids"] if node["parent"] else roots).append(node)
    return roots


def datasets_with_counts():
    return Dataset.objects.annotate(n_cells=Count("cells"), n_types=Count("cells__cell_type", distinct=True))

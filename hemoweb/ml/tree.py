"""The cell-type tree as plain data, and the per-node views of a labelled dataset.

A cell labelled at code L is an example of child C of inner node N when C lies on the path from N
down to L. A cell labelled at an inner node (NEU, MYI) trains every classifier above its label and
none below it.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# (code, name, parent code): the default tree. Codes are the interface to datasets: keep them.
DEFAULT_TREE: tuple[tuple[str, str, str | None], ...] = (
    ("ROOT", "All cells", None),
    ("ERY", "Erythropoiesis", "ROOT"),
    ("PEB", "Proerythroblast", "ERY"),
    ("EBO", "Erythroblast", "ERY"),
    ("LYM", "Lymphoid", "ROOT"),
    ("LYI", "Immature lymphocyte", "LYM"),
    ("LYT", "Lymphocyte", "LYM"),
    ("PLM", "Plasma cell", "LYM"),
    ("HAC", "Hairy cell", "LYM"),
    ("MYE", "Myeloid", "ROOT"),
    ("MYI", "Immature myeloid", "MYE"),
    ("BLA", "Myeloblast", "MYI"),
    ("PMO", "Promyelocyte", "MYI"),
    ("MYB", "Myelocyte", "MYI"),
    ("MMZ", "Metamyelocyte", "MYI"),
    ("MYM", "Mature myeloid", "MYE"),
    ("NEU", "Neutrophil", "MYM"),
    ("NGB", "Band neutrophil", "NEU"),
    ("NGS", "Segmented neutrophil", "NEU"),
    ("BAS", "Basophil", "MYM"),
    ("EOS", "Eosinophil", "MYM"),
    ("MON", "Monocyte", "MYM"),
    ("MEG", "Megakaryocytic", "ROOT"),
    ("PLT", "Platelet", "MEG"),
    ("ABN", "Abnormal", "ROOT"),
    ("NIF", "Not identifiable", "ABN"),
    ("OTH", "Other cell", "ABN"),
    ("ABE", "Abnormal eosinophil", "ABN"),
    ("ART", "Artefact", "ABN"),
    ("KSC", "Smudge cell", "ABN"),
    ("FGC", "Faggot cell", "ABN"),
)

# Other labels that public datasets use for a default code (matched without regard to case, like each
# code's name). The PBC set's folders (basophil, ig, ...) match names or these; its file-name labels
# (BA, SNE, MY, ...) are here, so PBC imports without a label map.
DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "BAS": ("BA",),
    "EOS": ("EO",),
    "EBO": ("ERB", "normoblast", "nucleated red cell"),
    "LYT": ("LY",),
    "MON": ("MO",),
    "NGB": ("BNE", "band"),
    "NGS": ("SNE", "segmented"),
    "PMO": ("PMY",),
    "MYB": ("MY",),
    "MMZ": ("MMY",),
    "MYI": ("IG", "immature granulocyte"),
    "PLT": ("PLATELET", "thrombocyte"),
    "BLA": ("blast",),
}

# The 8 classic peripheral-blood classes, for comparison with the literature.
COARSE8 = ("BAS", "EOS", "ERY", "MYI", "LYM", "MON", "NEU", "PLT")


class TreeError(ValueError):
    """The tree or a label does not fit (unknown code, a cycle, two roots)."""


@dataclass
class CellTree:
    """A rooted tree of cell-type codes with names."""

    parents: dict[str, str | None]
    names: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.order:
            self.order = list(self.parents)
        roots = [code for code, parent in self.parents.items() if parent is None]
        if len(roots) != 1:
            raise TreeError(f"The tree needs exactly one root, found {len(roots)}: {roots}")
        self.root = roots[0]
        self._children: dict[str, list[str]] = {code: [] for code in self.parents}
        for code in self.order:
            parent = self.parents[code]
            if parent is not None:
                if parent not in self.parents:
                    raise TreeError(f"{code}'s parent {parent} is not in the tree")
                self._children[parent].append(code)
        for code in self.parents:
            self.path(code)  # raises on cycles

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, str | None]]) -> "CellTree":
        rows = list(rows)
        return cls(
            parents={code: parent for code, _, parent in rows},
            names={code: name for code, name, _ in rows},
            order=[code for code, _, _ in rows],
        )

    @classmethod
    def default(cls) -> "CellTree":
        return cls.from_rows(DEFAULT_TREE)

    def __contains__(self, code: str) -> bool:
        return code in self.parents

    def children(self, code: str) -> list[str]:
        return self._children[code]

    def is_leaf(self, code: str) -> bool:
        return not self._children[code]

    def path(self, code: str) -> list[str]:
        """Codes from the root down to `code`, both included."""
        if code not in self.parents:
            raise TreeError(f"Unknown cell-type code {code!r}")
        path, seen = [code], {code}
        while (parent := self.parents[path[-1]]) is not None:
            if parent in seen:
                raise TreeError(f"The tree has a cycle through {parent}")
            path.append(parent)
            seen.add(parent)
        return path[::-1]

    def is_under(self, code: str, ancestor: str) -> bool:
        """True when `code` is `ancestor` or lies below it."""
        return ancestor in self.path(code)

    def descendants(self, code: str) -> list[str]:
        found, stack = [], list(self._children[code])
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(self._children[child])
        return found

    def inner_nodes(self) -> list[str]:
        return [code for code in self.order if self._children[code]]

    def child_towards(self, node: str, label: str) -> str | None:
        """The child of `node` on the way down to `label`; None when `label` is not below `node`."""
        path = self.path(label)
        if node not in path or path[-1] == node:
            return None
        return path[path.index(node) + 1]

    def lineage(self, code: str) -> str:
        """The first level below the root (ERY, LYM, MYE, ...); the root itself for the root."""
        path = self.path(code)
        return path[1] if len(path) > 1 else path[0]

    def coarse8(self, code: str) -> str | None:
        """The classic 8-class peripheral-blood label of `code`, or None when it has none."""
        for ancestor in reversed(self.path(code)):
            if ancestor in COARSE8:
                return ancestor
        return None


@dataclass(frozen=True)
class NodePlan:
    """What one inner node's classifier would learn from a dataset."""

    node: str
    classes: tuple[str, ...]
    counts: dict[str, int]
    skipped: str = ""  # why the node gets no classifier; empty when it is trained

    @property
    def trained(self) -> bool:
        return not self.skipped


def node_examples(tree: CellTree, labels: Sequence[str], node: str) -> list[tuple[int, str]]:
    """(index into labels, child class) for every labelled cell that teaches `node`'s classifier."""
    examples = []
    for index, label in enumerate(labels):
        child = tree.child_towards(node, label)
        if child is not None:
            examples.append((index, child))
    return examples


def plan_nodes(tree: CellTree, labels: Sequence[str], min_images: int = 10) -> list[NodePlan]:
    """One plan per inner node, top-down; nodes that cannot be trained say why."""
    plans = []
    for node in tree.inner_nodes():
        counts = Counter(child for _, child in node_examples(tree, labels, node))
        classes = tuple(child for child in tree.children(node) if counts.get(child))
        if len(classes) < 2:
            reason = (
                "no labelled cells below it"
                if not classes
                else f"only one child has data ({classes[0]}): nothing to decide"
            )
            plans.append(NodePlan(node, classes, dict(counts), skipped=reason))
            continue
        small = [code for code in classes if counts[code] < min_images]
        if small:
            detail = ", ".join(f"{code} has {counts[code]}" for code in small)
            plans.append(
                NodePlan(node, classes, dict(counts), skipped=f"too few images ({detail}; at least {min_images} needed)")
            )
            continue
        plans.append(NodePlan(node, classes, {code: counts[code] for code in classes}))
    return plans


def resolve_single_path(tree: CellTree, labels: Sequence[str], code: str) -> str:
    """Follow `code` down while all labelled data below it sits under one child.

    With PBC, everything under ERY is EBO, so a ROOT prediction of ERY means EBO.
    """
    present = set(labels)
    while not tree.is_leaf(code):
        with_data = [
            child for child in tree.children(code) if any(tree.is_under(label, child) for label in present)
        ]
        if len(with_data) != 1 or code in present:
            break
        code = with_data[0]
    return code

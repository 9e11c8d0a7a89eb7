"""Shared fixtures: the seeded tree, users in each role, the shipped demo images, a real browser."""

import os
import shutil
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User

from apps.accounts.roles import CURATOR, LAB_STAFF

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# Playwright's sync API runs an event loop in the test thread; the ORM calls made by the test
# itself (fixtures) are still synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(autouse=True)
def isolated_files(settings, tmp_path):
    """Media and models of each test live in its own temporary folder."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MODELS_DIR = tmp_path / "models"
    settings.MODELS_DIR.mkdir()
    return tmp_path


@pytest.fixture
def demo_pbc() -> Path:
    """130 real PBC cell images, 10 per fine label, with labels.csv and label_map.csv."""
    return DEMO / "pbc"


@pytest.fixture
def demo_bccd() -> Path:
    return DEMO / "bccd"


@pytest.fixture
def tree(db):
    from apps.cells.services import seed_cell_tree

    seed_cell_tree()
    from apps.cells.models import CellType

    return {node.code: node for node in CellType.objects.all()}


def _user(username: str, group: str | None) -> User:
    user = User.objects.create_user(username, password="pw-" + username)
    if group:
        user.groups.add(Group.objects.get(name=group))
    return user


@pytest.fixture
def curator(db) -> User:
    return _user("cura", CURATOR)


@pytest.fixture
def lab_user(db) -> User:
    return _user("tech", LAB_STAFF)


@pytest.fixture
def outsider(db) -> User:
    """Logged in, but in no role."""
    return _user("nobody", None)


@pytest.fixture
def curator_client(client, curator):
    client.force_login(curator)
    return client


@pytest.fixture
def lab_client(client, lab_user):
    client.force_login(lab_user)
    return client


@pytest.fixture
def pbc_dataset(tree, demo_pbc):
    """The demo images imported as dataset 'Demo PBC'."""
    from apps.cells.services import import_cells

    import_cells(
        demo_pbc,
        dataset="Demo PBC",
        labels_csv=(demo_pbc / "labels.csv").read_bytes(),
        label_map_csv=(demo_pbc / "label_map.csv").read_bytes(),
    )
    from apps.cells.models import Dataset

    return Dataset.objects.get(name="Demo PBC")


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, headless, driven by Playwright (no browser download)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    """A fresh browser page; a screenshot is kept in test-artifacts/ when the test ends."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-final.png"), full_page=True)
    context.close()


def login(page, live_server, username: str) -> None:
    page.goto(live_server.url + "/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw-" + username)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Log out")


def fill_tiny_training(page, dataset: str, name: str) -> None:
    """On the training form: a tiny run (2 epochs at 32 px on the CPU) of nodes ROOT and NEU."""
    page.select_option("#id_dataset", label=dataset)
    page.fill("#id_name", name)
    page.fill("#id_architecture", "mobilenetv3_small_050")
    page.fill("#id_epochs", "2")
    page.fill("#id_image_size", "32")
    page.fill("#id_batch_size", "8")
    page.select_option("#id_device", "cpu")
    page.check("input[name=nodes][value=ROOT]")
    page.check("input[name=nodes][value=NEU]")


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def copy_demo(destination: Path, subfolder: str) -> Path:
    """A writable copy of a demo folder (tests that damage files work on copies)."""
    target = destination / subfolder
    shutil.copytree(DEMO / subfolder, target)
    return target


# --- a tiny real model set (analysis; reusable by explain and detection) ---------------------------

TINY_ARCH = "mobilenetv3_small_050"
TINY_SIZE = 32


def train_tiny_set(folder: Path, steps: int = 12) -> Path:
    """Train one tiny timm classifier per tree node with data, on the 130 demo PBC images at 32 px.

    A few full-batch steps: predictions are real (real weights, real images), not accurate.
    """
    import csv

    import torch
    from PIL import Image

    from hemoweb.ml.preprocess import normalize, resize_uint8
    from hemoweb.ml.tree import CellTree, node_examples, plan_nodes, resolve_single_path
    from hemoweb.ml.weights import ModelCard, ModelSetCard, create_model, save_model, write_set

    tree = CellTree.default()
    with open(DEMO / "pbc" / "label_map.csv") as handle:
        label_map = {row["label"]: row["cell_type_code"] for row in csv.DictReader(handle)}
    with open(DEMO / "pbc" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    labels = [label_map[row["label"]] for row in rows]
    images = torch.stack([resize_uint8(Image.open(DEMO / "pbc" / row["path"]), TINY_SIZE) for row in rows])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    torch.manual_seed(0)
    nodes = {}
    for plan in plan_nodes(tree, labels, min_images=5):
        if not plan.trained:
            continue
        classes = list(plan.classes)
        examples = node_examples(tree, labels, plan.node)
        batch = normalize(images[[index for index, _ in examples]], mean, std)
        target = torch.tensor([classes.index(child) for _, child in examples])
        model = create_model(TINY_ARCH, len(classes))
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(batch), target).backward()
            optimiser.step()
        with torch.no_grad():  # batch-norm statistics of the data itself, so eval mode predicts sensibly
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
                    module.momentum = None
            model(batch)
        model.eval()
        resolves = {code: resolve_single_path(tree, labels, code) for code in classes}
        card = ModelCard(architecture=TINY_ARCH, node=plan.node, classes=classes, input_size=TINY_SIZE, mean=mean,
                         std=std, resolves_to={k: v for k, v in resolves.items() if v != k}, threshold=0.0,
                         data={"dataset": "demo/pbc", "images": len(examples)})
        save_model(model, card, folder / f"{plan.node}.safetensors")
        nodes[plan.node] = f"{plan.node}.safetensors"
    write_set(folder, ModelSetCard(name="tiny", nodes=nodes, architecture=TINY_ARCH, mode="scratch",
                                   input_size=TINY_SIZE))
    return folder


@pytest.fixture(scope="session")
def tiny_set_folder(tmp_path_factory) -> Path:
    """The trained tiny set, made once per test session (read-only: copy it before damaging it)."""
    import torch

    from hemoweb.ml.infer import TreeClassifier
    from hemoweb.ml.tree import CellTree

    torch.set_num_threads(1)
    folder = train_tiny_set(tmp_path_factory.mktemp("tiny-set") / "tiny")
    # its ONNX exports made once (where onnxruntime is installed): the copies tests make reuse them
    TreeClassifier(folder, CellTree.default(), engine="auto").check()
    return folder


@pytest.fixture
def tiny_model_set(tree, tiny_set_folder, settings):
    """A copy of the tiny set under this test's MODELS_DIR, registered and active (a ModelSet)."""
    from apps.classifiers.services import register_model_set

    folder = settings.MODELS_DIR / "tiny"
    shutil.copytree(tiny_set_folder, folder)
    return register_model_set(folder, name="tiny", activate=True)

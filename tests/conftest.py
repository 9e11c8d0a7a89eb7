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

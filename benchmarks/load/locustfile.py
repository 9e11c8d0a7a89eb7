"""Lab staff browsing pages and results and classifying small batches (locust, headless, loopback only)."""

import io
import os
import random
import zipfile
from pathlib import Path

from locust import HttpUser, between, task

DEMO = Path(__file__).resolve().parents[2] / "demo" / "pbc"
IMAGES = sorted(DEMO.rglob("*.jpg"))
TOKEN = os.environ["HEMOWEB_TOKEN"]
DATASET_ID = os.environ.get("HEMOWEB_DATASET_ID", "1")


def small_zip(n: int = 5) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in random.sample(IMAGES, n):
            archive.writestr(path.name, path.read_bytes())
    return buffer.getvalue()


class LabStaff(HttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Token {TOKEN}"
        response = self.client.get("/accounts/login/", name="login page")
        self.client.post("/accounts/login/", {"username": "loadtest", "password": "loadtest-pw",
                                              "csrfmiddlewaretoken": response.cookies.get("csrftoken", "")},
                         headers={"Referer": self.host + "/accounts/login/"}, name="login")
        self.runs: list[int] = []

    @task(4)
    def pages(self) -> None:
        for url in ("/", "/tree/", f"/datasets/{DATASET_ID}/", "/models/", "/analysis/"):
            self.client.get(url, name=f"page {url.split('/')[1] or 'start'}")

    @task(4)
    def api_reads(self) -> None:
        self.client.get("/api/cell-types/", name="api cell-types")
        self.client.get("/api/cells/?page_size=50", name="api cells")
        response = self.client.get("/api/classification-runs/", name="api runs")
        if response.ok and self.runs:
            self.client.get(f"/api/classification-runs/{random.choice(self.runs)}/", name="api run detail")

    @task(1)
    def classify_small_batch(self) -> None:
        response = self.client.post("/api/classification-runs/", files={"files": ("batch.zip", small_zip(), "application/zip")},
                                    name="api classify 5 cells")
        if response.status_code in (200, 201, 202):
            self.runs.append(response.json()["id"])

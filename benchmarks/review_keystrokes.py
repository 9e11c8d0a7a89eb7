"""Keystroke latency of the review gallery: a technologist reviews a 200-cell run with the keyboard in chromium.

    .venv/bin/python benchmarks/review_keystrokes.py [--cells 200] [--workers 2] [--name review_keystrokes-cpu]

Set-up (throw-away SQLite database, media and static folders under /tmp/hemoweb-keys): migrate, the cell tree, the
demo PBC cells as the reference library, the shipped default model set, one lab-staff user and one run of
`--cells` real PBC cells (from ../shared/data/pbc when it is there, else the 130 demo cells over again) classified by
`run_from_source`. Then gunicorn (DEBUG off, collected static files) and Debian's chromium through Playwright.

The review: skip link, then per cell Space (the type is right) or, every tenth cell, the key of another type, then
→; on every 25th cell + and − (zoom in the detail panel), and ↓ ↑ once a row. Each keystroke's latency is measured
in the page: from the key event's timestamp (`event.timeStamp`, when the browser received it) to the DOM update
that answers it, seen by a MutationObserver — for → ↓ ↑ the focus on the next cell and the detail panel showing it,
for + − the zoomed image, for Space and a type key the cell swapped in by htmx from the server's answer — and to the
next animation frame after it (the frame that shows it). p50 / p95 / max per kind of key and over all.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, hardware  # noqa: E402

WORK = Path("/tmp/hemoweb-keys")
DATA = REPO.parent / "shared" / "data" / "pbc"
DEMO = REPO / "demo" / "pbc"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
USER, PASSWORD = "bench-tech", "bench-keys-pw"
ENV = {**os.environ, "SQLITE_PATH": str(WORK / "db.sqlite3"), "MEDIA_ROOT": str(WORK / "media"),
       "VAR_DIR": str(WORK / "var"), "STATIC_ROOT": str(WORK / "static"), "DEBUG": "0",
       "SECRET_KEY": "benchmark-only-key-" + "x" * 40, "SECURE_SSL_REDIRECT": "0", "SECURE_COOKIES": "0",
       "SECURE_HSTS_SECONDS": "0", "CLASSIFY_SYNC_MAX": "1000", "DJANGO_SETTINGS_MODULE": "hemoweb.settings"}

# Installed in the page before its scripts: records each keystroke's latency to the DOM update it waits for.
RECORDER = """
(() => {
  window.__latencies = [];
  let pending = null;
  function check() {
    if (!pending) return;
    const now = performance.now(), record = pending;
    if (record.dom === undefined && record.shown()) {
      record.dom = now - record.t0;
      requestAnimationFrame(() => { record.frame = performance.now() - record.t0; finish(record); });
    }
    if (record.dom !== undefined && record.confirmed && record.confirm === undefined && record.confirmed()) {
      record.confirm = now - record.t0;
      finish(record);
    }
  }
  function finish(record) {  // pushed once the frame is drawn and, for a key the server answers, the answer is in
    if (record.frame === undefined || (record.confirmed && record.confirm === undefined) || record.pushed) return;
    record.pushed = true;
    if (pending === record) pending = null;
    window.__latencies.push({key: record.key, kind: record.kind, dom: record.dom, frame: record.frame,
                             confirm: record.confirm});
  }
  window.__pending = () => pending && {kind: pending.kind, dom: pending.dom, frame: pending.frame,
                                       confirm: pending.confirm};
  window.__expect = (kind, shown, confirmed) => { window.__next = {kind, shown, confirmed}; };
  addEventListener('keydown', (event) => {
    if (!window.__next) return;
    pending = {key: event.key, kind: window.__next.kind, shown: window.__next.shown,
               confirmed: window.__next.confirmed, t0: event.timeStamp};
    window.__next = null;
    setTimeout(check, 0);
  }, true);
  new MutationObserver(check).observe(document, {subtree: true, childList: true, attributes: true,
                                                 characterData: true});
  document.addEventListener('focusin', () => queueMicrotask(check));
})();
"""


def setup(n_cells: int) -> int:
    """In this process (ENV set): the database, models, user and the classified run; returns the run's id."""
    import django

    os.environ.update(ENV)
    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command

    from apps.accounts.roles import LAB_STAFF
    from apps.analysis.services import run_from_source
    from apps.cells.services import import_cells, seed_cell_tree
    from apps.classifiers.services import register_model_set

    call_command("migrate", verbosity=0)
    seed_cell_tree()
    import_cells(DEMO, dataset="Demo PBC", labels_csv=(DEMO / "labels.csv").read_bytes(),
                 label_map_csv=(DEMO / "label_map.csv").read_bytes())
    models = register_model_set(REPO / "models" / "default", name="default", activate=True)
    user = User.objects.create_user(USER, password=PASSWORD)
    user.groups.add(Group.objects.get(name=LAB_STAFF))
    source = WORK / "cells"
    source.mkdir()
    images = sorted(DATA.rglob("*.jpg")) if DATA.is_dir() else sorted(DEMO.rglob("*.jpg"))
    for i in range(n_cells):
        path = images[i * len(images) // n_cells] if len(images) >= n_cells else images[i % len(images)]
        shutil.copy(path, source / f"{i:04d}_{path.name}")
    run = run_from_source(source=source, models=models, owner=user, count_target=200)
    assert run.status == "succeeded" and run.cells.count() == n_cells, (run.status, run.error)
    return run.pk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def review(base: str, run_id: int) -> tuple[list[dict], dict]:
    from playwright.sync_api import TimeoutError, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        page.add_init_script(RECORDER)
        page.goto(base + "/accounts/login/")
        page.fill("#id_username", USER)
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Log out")
        page.goto(f"{base}/analysis/runs/{run_id}/")
        page.wait_for_selector("#detail-panel")
        keys = json.loads(page.get_attribute("#keymap", "data-keys"))
        key_for = {code: key for key, code in keys.items()}
        n = page.locator("[data-cell]").count()
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")  # skip to the cells
        unanswered = []

        def press(key: str, kind: str, shown_js: str, confirmed_js: str = "undefined") -> None:
            page.evaluate(f"() => window.__expect({kind!r}, {shown_js}, {confirmed_js})")
            before = page.evaluate("window.__latencies.length")
            page.keyboard.press(key)
            try:  # a function, not a string: the page's CSP forbids eval
                page.wait_for_function("(n) => window.__latencies.length > n", arg=before, timeout=10_000)
            except TimeoutError:
                unanswered.append({"key": key, "kind": kind, "seen": page.evaluate("window.__pending()"),
                                   "cell": page.evaluate(
                                       "() => document.activeElement.outerHTML.split('<template')[0].slice(0, 1500)")})
                page.evaluate("() => window.__expect(null, () => false)")

        moved = ("(() => { const from = document.activeElement.id; return () => { const e = document.activeElement;"
                 " return e.id !== from && e.matches('[data-cell]') &&"
                 " document.getElementById('detail-panel').getAttribute('data-showing') === e.id; }; })()")
        # shown: the cell says what was sent (or the server's cell is in already); confirmed: the server's cell
        shown = ("(() => { const old = document.activeElement; return () => old.classList.contains('saving') ||"
                 " !old.isConnected; })()")
        confirmed = ("(() => { const old = document.activeElement; return () => !old.isConnected &&"
                     " document.getElementById(old.id) && document.getElementById(old.id).getAttribute('data-review')"
                     " !== 'pending'; })()")
        zoomed = ("(() => { const img = document.querySelector('#detail-panel img[data-full]'), w = img.style.width;"
                  " return () => img.style.width !== w; })()")
        active = ("() => { const e = document.activeElement; return {id: e.id, code: e.dataset.code,"
                  " guess: e.dataset.guess, review: e.dataset.review}; }")
        last = page.locator("[data-cell]").last.get_attribute("id")
        reviewed: set[str] = set()
        for step in range(4 * n):  # every cell once; ↓ ↑ may not come back to the same cell between groups
            cell = page.evaluate(active)
            if cell["review"] == "pending" and cell["id"] not in reviewed:
                reviewed.add(cell["id"])
                if len(reviewed) % 25 == 5:
                    press("+", "zoom", zoomed)
                    press("-", "zoom", zoomed)
                if cell["guess"]:  # stopped unresolved: Enter takes its best guess
                    press("Enter", "accept", shown, confirmed)
                elif len(reviewed) % 10 == 3 or cell["code"] not in key_for:  # disagree (or a cell left at the root)
                    target = "MON" if cell["code"] != "MON" else "LYT"
                    press(key_for[target], "correct", shown, confirmed)
                else:
                    press(" ", "accept", shown, confirmed)
                if len(reviewed) % 30 == 7:
                    press("ArrowDown", "arrow", moved)
                    press("ArrowUp", "arrow", moved)
            if len(reviewed) == n:
                break
            press("ArrowRight" if cell["id"] != last else "Home", "arrow", moved)
        latencies = page.evaluate("window.__latencies")
        agent = page.evaluate("navigator.userAgent")
        browser.close()
    return latencies, {"chromium": agent, "cells": n, "reviewed": len(reviewed), "unanswered": unanswered}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 1),
            "p95_ms": round(ordered[max(0, int(round(0.95 * len(ordered))) - 1)], 1), "max_ms": round(ordered[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--name", default="review_keystrokes-cpu")
    parser.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help="review the last set-up's run again (no new set-up)")
    args = parser.parse_args()
    if args.setup_only:
        print(setup(args.cells))
        return
    started = time.perf_counter()
    if args.reuse and (WORK / "run_id").exists():  # the database of the last run, its cells reviewed again
        run_id = int((WORK / "run_id").read_text())
        subprocess.run([sys.executable, "manage.py", "shell", "-c", "from apps.analysis.models import ClassifiedCell; "
                        f"ClassifiedCell.objects.filter(run_id={run_id}).update(review_state='pending')"],
                       env=ENV, cwd=REPO, check=True)
    else:
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        out = subprocess.run([sys.executable, __file__, "--setup-only", "--cells", str(args.cells)], env=ENV,
                             cwd=REPO, check=True, capture_output=True, text=True)
        run_id = int(out.stdout.strip().splitlines()[-1])
        (WORK / "run_id").write_text(str(run_id))
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], env=ENV, cwd=REPO, check=True)
    setup_s = time.perf_counter() - started
    port = free_port()
    log = open(WORK / "gunicorn.log", "w")
    server = subprocess.Popen([str(REPO / ".venv/bin/gunicorn"), "hemoweb.wsgi:application", "-b", f"127.0.0.1:{port}",
                               "-w", str(args.workers), "--threads", "2"], env=ENV, cwd=REPO, stdout=log, stderr=log)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        latencies, browser = review(f"http://127.0.0.1:{port}", run_id)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    kinds = sorted({row["kind"] for row in latencies})
    result = {
        "what": f"keystroke latency reviewing a {args.cells}-cell run in chromium (key event to DOM update, and to "
                "the next animation frame)",
        "setup_s": round(setup_s, 1), "server": f"gunicorn {args.workers} workers x 2 threads, SQLite, DEBUG off",
        "browser": browser, "load_average": os.getloadavg(),
        "all": {"dom": summary([r["dom"] for r in latencies]), "frame": summary([r["frame"] for r in latencies])},
        "by_kind": {kind: {"dom": summary([r["dom"] for r in latencies if r["kind"] == kind]),
                           "frame": summary([r["frame"] for r in latencies if r["kind"] == kind]),
                           **({"server": summary(confirms)} if (confirms := [r["confirm"] for r in latencies
                                                                            if r["kind"] == kind and r.get("confirm")])
                              else {})} for kind in kinds},
        "over_100_ms": sum(1 for r in latencies if r["frame"] > 100),
        "unanswered": len(browser["unanswered"]),
        "target": "every keystroke answered in <= 100 ms",
    }
    write(args.name, result)


def triple(row: dict | None) -> str:
    return f"{row['p50_ms']} / {row['p95_ms']} / {row['max_ms']}" if row else "–"


def write(name: str, result: dict) -> None:
    from datetime import UTC, datetime

    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "date": datetime.now(UTC).isoformat(timespec="seconds"), "hardware": hardware(),
               **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    hw = payload["hardware"]
    lines = [f"# Review keystroke latency ({result['browser']['cells']} cells)", "",
             f"{payload['date']} · {hw['cpu']}, {hw['cores']} cores · {result['server']} · "
             f"load average {result['load_average'][0]:.1f} (shared machine) · {result['browser']['chromium']}", "",
             "| keys | n | DOM p50 ms | DOM p95 ms | DOM max ms | frame p50 ms | frame p95 ms | frame max ms "
             "| server's cell p50 / p95 / max ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, row in [("all", result["all"])] + sorted(result["by_kind"].items()):
        dom, frame, server = row["dom"], row["frame"], row.get("server")
        lines.append(f"| {label} | {dom['n']} | {dom['p50_ms']} | {dom['p95_ms']} | {dom['max_ms']} | "
                     f"{frame['p50_ms']} | {frame['p95_ms']} | {frame['max_ms']} | "
                     f"{triple(server)} |")
    lines += ["", f"Keystrokes over 100 ms (to the frame): {result['over_100_ms']}; unanswered within 10 s: "
              f"{result['unanswered']}. Target: {result['target']}.", "",
              "arrow: → ↓ ↑ Home (focus and detail panel, no server); zoom: + − in the panel; accept: Space (Enter "
              "for a best guess), correct: a type's key. From `event.timeStamp` to the MutationObserver seeing the "
              "answer (DOM) and to the next requestAnimationFrame (frame). For accept and correct the page answers at "
              "once (the cell shows the type sent, marked as saving); the last column is the time until the server's "
              "cell is swapped in by htmx (saved, review state set, counts updated)."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

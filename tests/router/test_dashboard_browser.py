"""The fleet dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against a real router, two fake replica processes and a real Redis key store: the login form,
both replicas on the page, numbers that move after traffic with no reload, a drain from the page
(confirmation accepted) that the admin API sees, and no console error (a CSP violation is one).

The screenshot goes to the test's tmp dir; with FLEET_DASHBOARD_SCREENSHOT=docs/dashboard.png it
also refreshes the one in the docs. Skipped where /usr/bin/chromium or playwright is missing
(`.ci/run` installs chromium; never `playwright install`: it downloads from Google's hosts).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from router_harness import (
    ADMIN,
    MODEL,
    ROOT,
    FakeReplica,
    chat,
    fake_replicas,
    fresh,
    router_config,
    run_router,
)

CHROMIUM = Path("/usr/bin/chromium")
# Without these Chromium calls Google's hosts at start-up (and fails where they are unreachable).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package")
async_api = pytest.importorskip("playwright.async_api")


@pytest.fixture(scope="module")
def pair() -> Iterator[list[FakeReplica]]:
    with fake_replicas(
        2, "--model", MODEL, "--chunks", "24", "--kv-cache-tokens", "8192"
    ) as started:
        yield started


async def traffic(router, headers: dict[str, str], seconds: float, workers: int = 4) -> int:
    """Chat requests (every other one streamed) from a few clients for a while; returns how many."""
    deadline = time.monotonic() + seconds
    sent = 0

    async def worker(n: int) -> None:
        nonlocal sent
        i = 0
        while time.monotonic() < deadline:
            body = chat(f"worker {n} asks question {i % 5}: " + "context " * 40, stream=i % 2 == 0)
            response = await router.client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200
            sent += 1
            i += 1

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return sent


async def admin_drained(router, replica_id: str) -> bool:
    listing = (await router.client.get("/admin/replicas", headers=ADMIN)).json()["data"]
    return next(r for r in listing if r["id"] == replica_id)["admin_drained"]


async def test_the_dashboard_in_chromium_shows_the_fleet_live_and_drains(
    pair, key_store, tmp_path
) -> None:
    replicas = fresh(pair)
    for fake in replicas:
        fake.configure(delay=0.02, chunk_delay=0.004)
    _, secret = await key_store.admin.create("team-a", rpm=600, tpm=500_000, max_concurrent=8)
    await key_store.admin.create("batch-jobs", models=[MODEL], tpm=2_000_000)
    user = {"Authorization": f"Bearer {secret}"}
    config = router_config(replicas, policy="prefix")
    async with (
        run_router(config, key_store=key_store) as router,
        async_api.async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1100})
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            await page.goto(router.url + "/dashboard")
            assert page.url == router.url + "/dashboard/login"
            await page.fill("#key", "admin-secret")
            await page.click("button[type=submit]")
            await page.wait_for_url(router.url + "/dashboard")
            for fake in replicas:
                row = page.locator(f'tr[data-replica-id="{fake.id}"]')
                await row.wait_for()
                assert await row.get_attribute("data-state") == "ready"
            assert await requests_shown(page) == 0

            sent = await traffic(router, user, seconds=4.0)
            await page.wait_for_function(
                "n => [...document.querySelectorAll('td[data-field=requests]')]"
                ".reduce((sum, td) => sum + Number(td.textContent.replace(/\\D/g, '')), 0) === n",
                arg=sent,
            )
            more = asyncio.create_task(traffic(router, user, seconds=3.0, workers=2))
            await page.wait_for_function(
                "() => [...document.querySelectorAll('td[data-field=tokens]')]"
                ".some(td => parseFloat(td.textContent.replace(/,/g, '')) > 0)"
            )
            await page.locator("#keys tbody tr").first.wait_for()
            assert "team-a" in await page.locator("#keys").inner_text()

            target = replicas[0].id
            dialogs: list[str] = []

            async def accept(dialog) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", accept)
            await page.click(f'tr[data-replica-id="{target}"] button')
            await page.wait_for_selector(f'tr[data-replica-id="{target}"][data-state="draining"]')
            assert await admin_drained(router, target)
            assert not await admin_drained(router, replicas[1].id)
            assert dialogs and target in dialogs[0]
            await more
            await page.wait_for_selector("#events li[data-kind=draining]")
            await asyncio.sleep(1.5)  # one more poll, so the plots hold the last traffic

            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            wanted = os.environ.get("FLEET_DASHBOARD_SCREENSHOT")
            if wanted:
                shutil.copyfile(shot, ROOT / wanted)
            assert errors == []
        finally:
            await browser.close()


async def requests_shown(page) -> int:
    cells = await page.locator("td[data-field=requests]").all_inner_texts()
    return sum(int("".join(ch for ch in text if ch.isdigit()) or 0) for text in cells)

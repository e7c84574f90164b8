"""The admin UI in real headless Chromium (Debian's `chromium`, driven by Playwright), used as a
person uses it: seed 002's UI path word for word, a request billed to the customer made there,
blocking it from its page, a viewer, a wrong key, keyboard-only sign-in and a phone-sized screen.

Every page any test opens is checked for console errors; each test saves screenshots of the pages
it checks under test-artifacts/ui/ (or $SPENDLEDGER_TEST_ARTIFACTS). Chromium comes from the test
setup (scripts/test installs Debian's package); without it these tests fail, they never skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.e2e.conftest import MASTER_KEY
from tests.e2e.test_admin_ui import api, user_key
from tests.support import PROJECT_ROOT, RunningServer

CHROMIUM = os.environ.get("SPENDLEDGER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SPENDLEDGER_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts")) / "ui"
# Chromium as this machine runs it: no sandbox (root in a container), and none of its calls home
# (the network is closed: they would only fail, and slowly).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser(server: RunningServer) -> Iterator[Browser]:
    # After the server: Playwright's loop runs in this thread until the browser closes, and the
    # server's fixtures make their databases with asyncio.run.
    assert Path(CHROMIUM).exists(), (
        f"no Chromium at {CHROMIUM}: scripts/test installs Debian's chromium (or set SPENDLEDGER_CHROMIUM)"
    )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Visit:
    """One person's browser tab, its console errors, and the screenshots it saves."""

    def __init__(self, context: BrowserContext, server: RunningServer, name: str) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.base = server.base_url
        self.name = name
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(f"{self.page.url}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"{self.page.url}: {e}"))
        self.page.on("dialog", lambda dialog: dialog.accept())  # "Block …?" confirmations
        self.shots = 0
        self.provoked: tuple[str, ...] = ()  # console errors a test provokes on purpose (a 401 page)

    def go(self, path: str) -> None:
        self.page.goto(self.base + path)

    def shot(self, what: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.shots += 1
        self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{self.shots:02d}-{what}.png"), full_page=True)

    def sign_in(self, key: str) -> None:
        self.go("/")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="Budgets")).to_be_visible()


@pytest.fixture
def visit(browser: Browser, server: RunningServer, request: pytest.FixtureRequest) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    tab = Visit(context, server, request.node.name.removeprefix("test_")[:60])
    yield tab
    context.close()
    assert tab.shots > 0, "each test saves a screenshot of the pages it checks"
    # An answer a test provoked on purpose is logged by Chromium as a failed load; nothing else may be.
    unexpected = [e for e in tab.console_errors if not any(p in e for p in tab.provoked)]
    assert unexpected == [], unexpected


def test_seed_002_by_ui_a_tier_a_customer_on_it_its_spend_and_blocking_it(visit: Visit, server: RunningServer) -> None:
    page = visit.page
    tier, customer = "my-free-tier", "my-customer-id"  # the seed's own names: this module's server is fresh
    visit.sign_in(MASTER_KEY)

    # "go to the 'Budgets' tab on the UI, click '+ Create Budget', create your pricing tier
    #  (e.g. 'my-free-tier' with a $4 budget)"
    page.get_by_role("link", name="Budgets", exact=True).click()
    page.get_by_role("link", name="+ Create Budget").click()
    page.get_by_label("Budget ID").fill(tier)
    page.get_by_label("Max Budget").fill("4")
    page.get_by_role("button", name="Create").click()
    row = page.locator(f'tr[data-budget="{tier}"]')
    expect(row).to_contain_text("$4")
    visit.shot("budgets-tab")

    # The customer, on that tier, through the Customers page.
    page.get_by_role("link", name="Customers", exact=True).click()
    page.get_by_role("link", name="+ Create Customer").click()
    page.get_by_label("Customer ID").fill(customer)
    page.get_by_label("Budget ID").select_option(tier)
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name=f"Customer {customer}")).to_be_visible()
    expect(page.get_by_test_id("customer-spend")).to_have_text("$0")

    # A request as that customer, through the proxy: its exact cost appears on both pages.
    answer = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        json={"model": "fake-openai-endpoint", "user": customer, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200, answer.text
    cost = Decimal(answer.headers["x-litellm-response-cost"])
    assert cost > 0
    shown = "$" + format(cost.normalize(), "f")
    page.reload()
    expect(page.get_by_test_id("customer-spend")).to_have_text(shown)
    expect(page.locator("table").last).to_contain_text(answer.headers["x-litellm-call-id"])
    visit.shot("customer-page")
    page.get_by_role("link", name="Budgets", exact=True).click()
    expect(row.locator("td").nth(5)).to_have_text("1")  # customers on the tier
    expect(row.locator("td").nth(6)).to_have_text(shown)  # their spend this period
    visit.shot("tier-total")

    # Blocked from its page: the proxy refuses it.
    visit.go(f"/ui/customer?id={customer}")
    page.get_by_role("button", name="Block").click()
    expect(page.get_by_role("status")).to_contain_text("blocked")
    visit.shot("blocked")
    refused = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        json={"model": "fake-openai-endpoint", "user": customer, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 403, refused.text
    # The audit log names who did each of it: the master key, signed in.
    audit = httpx.get(f"{server.base_url}/audit/events", params={"customer": customer, "actor": "master_key"},
                      headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert {"CustomerCreated", "CustomerBlocked"} <= {e["type"] for e in audit["events"]}


def test_a_viewer_sees_every_page_and_no_button_to_change_anything(visit: Visit, server: RunningServer) -> None:
    tier = f"viewer-sees-{uuid.uuid4().hex[:6]}"
    api(server, "/budget/new", {"budget_id": tier, "max_budget": 4})
    visit.sign_in(user_key(server, "proxy_admin_viewer"))
    page = visit.page
    expect(page.get_by_text("read only")).to_be_visible()
    for tab in ("Budgets", "Customers", "Keys", "Teams", "Internal Users", "Spend", "Delivery"):
        page.get_by_role("link", name=tab, exact=True).click()
        expect(page.get_by_role("heading", name=tab, exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Delete")).to_have_count(0)
        expect(page.get_by_role("button", name="Block")).to_have_count(0)
        expect(page.get_by_role("link", name="+ Create Budget")).to_have_count(0)
        visit.shot(tab.lower().replace(" ", "-"))
    # The form's POST, sent anyway with the viewer's own session and CSRF token: refused.
    token = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    answer = page.request.post(server.base_url + "/ui/budgets/delete", form={"budget_id": tier, "csrf_token": token or ""})
    assert answer.status == 403
    assert api(server, "/budget/info", {"budgets": [tier]})[0]["budget_id"] == tier


def test_every_page_and_form_of_an_admin_renders_without_a_console_error(visit: Visit) -> None:
    """Console errors include what the Content-Security-Policy blocks: an inline script or style
    slipped into a template fails here."""
    visit.sign_in(MASTER_KEY)
    for path in ("/ui/keys", "/ui/keys/new", "/ui/teams", "/ui/teams/new", "/ui/users", "/ui/users/new",
                 "/ui/customers", "/ui/customers/new", "/ui/budgets/new", "/ui/spend", "/ui/delivery"):
        visit.go(path)
        expect(visit.page.locator("main h1")).to_be_visible()
        visit.shot(path.strip("/").replace("/", "-"))
    # A key generated here is shown once, with a button that copies it.
    visit.go("/ui/keys/new")
    visit.page.get_by_label("Key Alias").fill(f"browser-{uuid.uuid4().hex[:6]}")
    visit.page.get_by_role("button", name="Generate").click()
    secret = visit.page.locator("#new-key")
    expect(secret).to_contain_text("sk-")
    visit.page.get_by_role("button", name="Copy").click()
    expect(visit.page.get_by_role("button", name="Copied")).to_be_visible()
    visit.shot("key-generated")


def test_a_wrong_key_stays_on_the_sign_in_form(visit: Visit) -> None:
    visit.provoked = ("the server responded with a status of 401",)
    visit.go("/ui/budgets")
    page = visit.page
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill("sk-wrong-key-for-this-server")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("cannot sign in")
    expect(page.get_by_label("API key")).to_be_visible()
    visit.shot("wrong-key")
    assert "spendledger_ui" not in {c["name"] for c in visit.context.cookies()}


def test_a_form_posted_without_its_csrf_token_is_refused(visit: Visit, server: RunningServer) -> None:
    visit.sign_in(MASTER_KEY)
    tier = f"csrf-less-{uuid.uuid4().hex[:6]}"
    # The session cookie goes with it (same browser), the token does not: as a forged form would.
    answer = visit.page.request.post(server.base_url + "/ui/budgets/new", form={"budget_id": tier, "max_budget": "4"})
    assert answer.status == 403 and "CSRF" in answer.text()
    visit.go("/ui/budgets")
    expect(visit.page.get_by_text(tier)).to_have_count(0)
    visit.shot("after-forged-post")


def test_signed_in_with_the_keyboard_alone_and_read_on_a_phone(browser: Browser, server: RunningServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    tab = Visit(context, server, "phone")
    page = tab.page
    tab.go("/ui/login")
    expect(page.get_by_label("API key")).to_be_focused()  # autofocus: type straight away
    page.keyboard.type(MASTER_KEY)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Budgets")).to_be_visible()
    page.keyboard.press("Tab")  # the first stop is the brand link, then the tabs
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Budgets", exact=True)).to_be_focused()
    tab.go("/ui/customers")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px screen"  # tables scroll in their own box
    tab.shot("customers-on-a-phone")
    tab.go("/ui/spend")
    tab.shot("spend-on-a-phone")
    context.close()
    assert tab.console_errors == []

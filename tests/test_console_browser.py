"""The console in a real browser (headless Debian Chromium through Playwright): a gateway
process with the sandbox shared record; an operator logs in, finds a message sent over MLLP
during the test by its control id, reads it laid out by segment and field (the Arabic name
right-to-left), sees its delivery, replays it and sees one more attempt; a viewer sees the
same message without the replay button, and a replay posted anyway is refused 403."""
from __future__ import annotations

import re
import time
import uuid

import pytest
from playwright.sync_api import expect, sync_playwright

from browser_support import (ARABIC_FAMILY_NAME, PASSWORDS, admission, launch_chromium,
                             screenshot, send, start_console_gateway, stop_gateway, until)

pytestmark = pytest.mark.slow
pytest.importorskip("gateway.admin", reason="the console (gateway/admin.py) is not written yet")
DESTINATION = "shared-record"
expect.set_options(timeout=10_000)


@pytest.fixture(scope="module")
def console(dev_pki, tmp_path_factory):
    gateway = start_console_gateway(tmp_path_factory.mktemp("console-gateway"), dev_pki)
    yield gateway
    stop_gateway(gateway.process)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser):
    """A fresh browser profile (its own cookies) per test, in French like the console."""
    context = browser.new_context(locale="fr-MA", viewport={"width": 1280, "height": 900})
    yield context
    context.close()


def log_in(page, console, account: str) -> None:
    page.goto(f"{console.url}/")
    form = page.locator("form#login")
    expect(form).to_be_visible()
    form.locator("input[name=username]").fill(account)
    form.locator("input[name=password]").fill(PASSWORDS[account])
    form.locator("button[type=submit]").click()
    expect(page.locator("#account")).to_contain_text(account)
    expect(page.locator("form#login")).to_have_count(0)


def log_out(page) -> None:
    page.locator("form#logout").locator("button, input[type=submit]").first.click()
    expect(page.locator("form#login")).to_be_visible()


def test_login_page_renders_and_refuses_a_wrong_password(console, context):
    page = context.new_page()
    response = page.goto(f"{console.url}/messages")
    assert response is not None and response.ok
    form = page.locator("form#login")  # an anonymous visitor is shown the login form
    expect(form).to_be_visible()
    expect(form.locator("input[name=username]")).to_be_editable()
    expect(form.locator("input[name=password]")).to_have_attribute("type", "password")
    form.locator("input[name=username]").fill("operator")
    form.locator("input[name=password]").fill("not-the-password")
    form.locator("button[type=submit]").click()
    expect(page.locator("form#login")).to_be_visible()  # still outside
    expect(page.locator("#account")).to_have_count(0)
    expect(page.locator("nav a[href='/messages']")).to_have_count(0)
    log_in(page, console, "operator")
    for href in ("/messages", "/destinations", "/facilities", "/mappings"):
        expect(page.locator(f"nav a[href='{href}']")).to_have_count(1)
    expect(page.locator("#account")).to_contain_text("operator")

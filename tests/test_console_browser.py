"""The console in a real browser (headless Debian Chromium through Playwright): a gateway
process with the sandbox shared record; an operator logs in, finds a message sent over MLLP
during the test by its control id, reads it laid out by segment and field (the Arabic name
right-to-left), sees its delivery, replays it and sees one more attempt; a viewer sees the
same message without the replay button, and a replay posted anyway is refused 403."""
from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect, sync_playwright

from browser_support import (ARABIC_FAMILY_NAME, PASSWORDS, ROOT, admission, launch_chromium,
                             screenshot, screenshot_of, send, start_console_gateway,
                             stop_gateway, until)

pytestmark = pytest.mark.slow
if not (ROOT / "gateway" / "admin.py").exists():  # only while the console is being written
    pytest.skip("the console (gateway/admin.py) is not written yet", allow_module_level=True)
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


def new_context(browser):
    """A fresh browser profile (its own cookies), in French like the console."""
    return browser.new_context(locale="fr-MA", viewport={"width": 1280, "height": 900})


@pytest.fixture
def context(browser):
    context = new_context(browser)
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


# The innermost elements that hold `text`, with their computed direction, as the browser
# lays them out: [{tag, direction, inSegments, inRaw}].
_DIRECTIONS = """text => {
    const found = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
        const node = walker.currentNode;
        if (!node.nodeValue.includes(text)) continue;
        const element = node.parentElement;
        found.push({tag: element.tagName.toLowerCase(),
                    direction: getComputedStyle(element).direction,
                    inSegments: !!element.closest('table#segments'),
                    inRaw: !!element.closest('pre#raw')});
    }
    return found;
}"""


def post_form(page, console, action: str):
    """POST to `action` with this page's session cookie and CSRF token (the hidden input of
    the logout form), as a form submitted by script would; the answer, redirects not followed."""
    csrf = page.locator("form#logout input[type=hidden]").first
    field, token = csrf.get_attribute("name"), csrf.get_attribute("value")
    assert field and token
    url = action if "://" in action else console.url + action
    return page.request.post(url, form={field: token}, max_redirects=0)


def attempts(page):
    return page.locator(f"section#deliveries div.delivery[data-destination='{DESTINATION}'] "
                        "table.attempts tr.attempt")


def attempt_count_after_reload(page, at_least: int) -> int:
    """Reload the message page until the delivery shows `at_least` attempts; their number."""
    def count():
        page.reload()
        n = attempts(page).count()
        return n if n >= at_least else 0
    return until(count, timeout=15, interval=0.3, what=f"{at_least} attempt(s) to {DESTINATION}")


def test_operator_finds_opens_and_replays_a_message_a_viewer_cannot(console, browser):
    started = time.monotonic()
    control_id = f"BRW{uuid.uuid4().hex[:12].upper()}"
    patient_id = f"77{uuid.uuid4().int % 10**8:08d}"
    assert send(console.mllp_port, admission(control_id, patient_id)) in ("AA", "CA")

    operator = new_context(browser)
    page = operator.new_page()
    log_in(page, console, "operator")

    # Found by its control id among everything the gateway holds.
    page.locator("nav a[href='/messages']").click()
    search = page.locator("form#search")
    for name in ("control_id", "patient", "facility", "type", "status", "since", "until"):
        expect(search.locator(f"[name={name}]")).to_have_count(1)
    search.locator("input[name=control_id]").fill(control_id)
    search.locator("button[type=submit], input[type=submit]").first.click()
    rows = page.locator("table#messages tr.message")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(control_id)
    rows.first.locator("a.message-link").click()
    message_url = page.url
    assert message_url.startswith(console.url) and "/messages/" in message_url

    # The raw message by segment and field, the Arabic name right-to-left.
    expect(page.locator("pre#raw, table#segments").first).to_be_visible()
    segments = page.locator("table#segments")
    expect(segments).to_contain_text("PID")
    expect(segments).to_contain_text("Patient Name")
    expect(segments).to_contain_text(control_id)
    expect(page.locator("section#ack")).to_contain_text(control_id)  # MSA-2 names it
    expect(page.locator("section#canonical")).to_contain_text("Patient")
    holders = page.evaluate(_DIRECTIONS, ARABIC_FAMILY_NAME)
    laid_out = [h for h in holders if h["inSegments"]]
    assert laid_out, f"the Arabic name is not in table#segments: {holders}"
    assert any(h["direction"] == "rtl" for h in laid_out), \
        f"no element of table#segments holding the Arabic name is right-to-left: {laid_out}"

    # Delivered to the shared record: an attempt shows; a replay adds one.
    before = attempt_count_after_reload(page, at_least=1)
    replay = page.locator("form.replay button.replay")
    expect(replay).to_have_count(1)
    replay_action = page.locator("form.replay").get_attribute("action")
    replay.click()
    expect(page.locator(".notice")).to_be_visible()
    assert urlsplit(page.url).path == urlsplit(message_url).path  # 303 back to the message
    after = attempt_count_after_reload(page, at_least=before + 1)
    assert after == before + 1
    # The same replay posted as the viewer will post it below: accepted from an operator.
    response = post_form(page, console, replay_action)
    assert response.status == 303, (response.status, response.text()[:500])
    after = attempt_count_after_reload(page, at_least=after + 1)
    assert after == before + 2
    screenshot(page, "console-message-operator")
    screenshot_of(page.locator("table#segments tbody", has_text="PID-5").first, "console-pid")
    screenshot_of(page.locator("section#deliveries"), "console-deliveries")
    log_out(page)
    operator.close()

    # A viewer reads the same message but cannot replay it, not even by posting the form.
    viewer = new_context(browser)
    page = viewer.new_page()
    log_in(page, console, "viewer")
    page.goto(message_url)
    expect(page.locator("table#segments")).to_contain_text(control_id)
    expect(page.locator("form.replay")).to_have_count(0)
    expect(page.locator("button.replay")).to_have_count(0)
    expect(page.locator("form.dead-letter")).to_have_count(0)
    response = post_form(page, console, replay_action)
    assert response.status == 403, (response.status, response.text()[:500])
    time.sleep(1.0)  # a replay that went through anyway would show by now (poll: 0.1 s)
    page.reload()
    assert attempts(page).count() == after
    screenshot(page, "console-message-viewer", full_page=False)  # the top, as a viewer sees it
    viewer.close()
    assert time.monotonic() - started < 30, f"took {time.monotonic() - started:.1f} s"

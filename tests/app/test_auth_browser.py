"""Sign-in as a person does it, in Debian's chromium: the form, a wrong password, then the app."""

from __future__ import annotations

import shutil

import pytest

from tests.app.test_auth import PASSWORDS, server  # noqa: F401  (the live sign-in server)

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_sign_in_form_then_the_app(server, browser, tmp_path):  # noqa: F811
    _, url, _ = server
    page = browser.new_page()
    page.goto(url + "/")
    page.get_by_role("heading", name="DPO Studio").wait_for()
    page.get_by_label("User name").fill("bob")
    page.get_by_label("Password").fill("not-his-password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="Wrong user name or password.").wait_for()
    page.screenshot(path=tmp_path / "wrong-password.png")

    page.get_by_label("Password").fill(PASSWORDS["bob"])
    page.get_by_role("button", name="Sign in").click()
    # The Gradio app itself, with the demo's buttons.
    page.get_by_role("button", name="vote").wait_for(timeout=30_000)
    assert "Sign in" not in page.content()
    # An annotator pressing an admin-only button sees why nothing happened.
    page.get_by_role("button", name="train").click()
    page.get_by_text("Only an admin can start training").first.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "refused.png")
    page.close()

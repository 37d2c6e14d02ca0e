"""The web console in a real browser (Debian's chromium and chromium-driver, driven by
Selenium) against the real daemon: log in with the keyboard, search, open a message,
read an HTML message as text, download the .eml, object to a sub-processor, export a
person's mail and erase it after a preview, place and release a legal hold, read the
audit log, log out.
Screenshots of each step go to artifacts/console/ (MAILFLOWR_TEST_ARTIFACTS to move
it), for a person to look at."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.passwords import hash_password
from gateway.store.console import ConsoleStore
from gateway.store.models import subprocessor_objections
from tests.conftest import need_tool, wait_for
from tests.test_api import make_api_gateway


@pytest.fixture
def console_gateway(make_gateway: Any, tmp_path: Any, relay: Any) -> tuple[Any, Any]:
    """tests.test_api's daemon: mail of acme and globex, the sub-processor relay-eu."""
    return make_api_gateway(make_gateway, tmp_path, relay)

PASSWORD = "a long console password"
SUBJECT = "jane.doe@sender.test"
HTML = ("<html><head><title>hidden title</title><style>p {color: red}</style></head>"
        "<body><p>Dear Jane,</p><script>document.title = 'ran'</script>"
        "<img src=\"http://127.0.0.1:9/pixel.png\"><p>your file is attached</p></body></html>")


def _artifacts() -> Path:
    path = Path(os.environ.get("MAILFLOWR_TEST_ARTIFACTS", "artifacts")) / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = need_tool("chromium", "chromium")
    chromedriver = need_tool("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1366,768", "--lang=en-GB"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(tmp_path / "downloads"),
        "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _shown(driver: Any, css: str, timeout: float = 15) -> Any:
    from selenium.webdriver.common.by import By

    def visible() -> Any:
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return found[0] if found else None
    return wait_for(visible, timeout, f"{css} to be shown")


def _texts(driver: Any, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def test_a_privacy_officer_does_the_work_of_a_request_in_a_browser(
        console_gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    gw, api = console_gateway
    with gw.smtp() as s:
        s.sendmail("html@client.test", ["support@acme.test"],
                   ("From: Jane Doe <jane.doe@sender.test>\r\nTo: support@acme.test\r\n"
                    "Subject: an HTML letter\r\nMIME-Version: 1.0\r\n"
                    "Content-Type: text/html; charset=utf-8\r\n\r\n" + HTML).encode())
    gw.wait_processed(5)
    ConsoleStore(gw.store).add_user("acme", "dpo@acme.test", hash_password(PASSWORD),
                                    frozenset({"admin"}))
    shots = _artifacts()
    port = api.base.rsplit(":", 1)[1]

    # log in with the keyboard only: type, Tab to the password, Enter
    browser.get(f"http://localhost:{port}/")
    login = _shown(browser, "#login-name")
    assert browser.switch_to.active_element == login  # the focus starts there
    browser.save_screenshot(str(shots / "01-login.png"))
    login.send_keys("dpo@acme.test", Keys.TAB)
    browser.switch_to.active_element.send_keys(PASSWORD, Keys.ENTER)
    _shown(browser, "#app")
    assert browser.find_element(By.ID, "who").text == "acme · console:dpo@acme.test"

    # search: acme's mail from jane, not globex's
    query = browser.switch_to.active_element
    assert query.get_attribute("id") == "q"
    query.send_keys("jane", Keys.ENTER)
    wait_for(lambda: "shown" in browser.find_element(By.ID, "search-status").text, 15,
             "the results")
    assert sorted(_texts(browser, "#results li button")) == ["acme from jane",
                                                              "an HTML letter"]
    assert "jane" in [t.lower() for t in _texts(browser, "#results mark")]
    browser.save_screenshot(str(shots / "02-search.png"))

    # open one: its text, its details; download its .eml
    browser.find_element(By.XPATH, "//ol[@id='results']//button[.='acme from jane']").click()
    _shown(browser, "#message-view")
    assert browser.find_element(By.ID, "m-subject").text == "acme from jane"
    assert browser.find_element(By.ID, "m-text").text == "body of acme from jane"
    meta = dict(zip(_texts(browser, "#m-meta dt"), _texts(browser, "#m-meta dd"), strict=True))
    assert meta["From"] == "jane.doe@sender.test"
    assert meta["Retention"].startswith("default (1y), until ")
    browser.save_screenshot(str(shots / "03-message.png"))
    browser.find_element(By.ID, "m-eml").click()
    downloaded = wait_for(lambda: [p for p in (tmp_path / "downloads").glob("*.eml")]
                          if (tmp_path / "downloads").exists() else None, 15, "the .eml")
    assert downloaded[0].name == f"{meta['Id']}.eml"
    assert b"Subject: acme from jane" in downloaded[0].read_bytes()

    # the HTML letter reads as text: nothing of it runs or loads
    browser.find_element(By.ID, "back").click()
    browser.find_element(By.XPATH, "//ol[@id='results']//button[.='an HTML letter']").click()
    wait_for(lambda: browser.find_element(By.ID, "m-subject").text == "an HTML letter", 15,
             "the HTML letter")
    assert browser.find_element(By.ID, "m-text").text == "Dear Jane,\n\nyour file is attached"
    assert "without its markup" in browser.find_element(By.ID, "m-text-note").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
    assert browser.title == "MailFlowr console"
    browser.save_screenshot(str(shots / "04-html-as-text.png"))

    # object to the sub-processor, confirming
    browser.find_element(By.CSS_SELECTOR, "nav button[data-view='subprocessors']").click()
    button = _shown(browser, "#sp-table button")
    assert button.text == "Object to relay-eu"
    browser.save_screenshot(str(shots / "05-subprocessors.png"))
    button.click()
    browser.switch_to.alert.accept()
    wait_for(lambda: "recorded" in browser.find_element(By.ID, "sp-status").text, 15,
             "the objection")
    with gw.store.engine.connect() as conn:
        rows = [(r.tenant_id, r.subprocessor, r.actor)
                for r in conn.execute(select(subprocessor_objections))]
    assert rows == [("acme", "relay-eu", "console:dpo@acme.test")]
    assert "no:" in _texts(browser, "#sp-table td")[3]
    browser.save_screenshot(str(shots / "06-objected.png"))

    # a person's data: export it (with its progress), then erase it after a preview
    browser.find_element(By.CSS_SELECTOR, "nav button[data-view='person']").click()
    person = _shown(browser, "#person")
    assert browser.switch_to.active_element == person
    person.send_keys(SUBJECT, Keys.ENTER)
    wait_for(lambda: "is ready" in browser.find_element(By.ID, "export-status").text, 30,
             "the export")
    browser.find_element(By.ID, "export-download").click()
    archive = wait_for(lambda: list((tmp_path / "downloads").glob("export-*.tar")), 15,
                       "the export's archive")[0]
    with tarfile.open(archive) as tar:
        texts = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    assert b"acme from jane" in texts and b"an HTML letter" in texts
    assert b"acme from bob" not in texts and b"globex from jane" not in texts
    browser.save_screenshot(str(shots / "07-export.png"))

    browser.find_element(By.ID, "erase-preview").click()
    plan = _shown(browser, "#erase-plan")
    assert plan.text.startswith(f"2 messages with {SUBJECT} would be erased")
    assert browser.switch_to.active_element.get_attribute("id") == "erase-cancel"
    browser.save_screenshot(str(shots / "08-erase-preview.png"))
    assert len(gw.messages(tenant="acme")) == 4  # the preview erased nothing
    confirm = browser.find_element(By.ID, "erase-confirm")
    assert confirm.text == "Erase 2 messages"
    confirm.click()
    wait_for(lambda: "Erased: 2 messages" in browser.find_element(By.ID, "erase-status").text,
             30, "the erasure")
    assert sorted(m["subject"] for m in gw.messages(tenant="acme")) == ["acme from bob",
                                                                        "acme held"]
    assert [m["subject"] for m in gw.messages(tenant="globex")] == ["globex from jane"]

    # a legal hold placed and released
    browser.find_element(By.CSS_SELECTOR, "nav button[data-view='holds']").click()
    _shown(browser, "#hold-name").send_keys("case-7")
    browser.find_element(By.ID, "hold-reason").send_keys("a court's order")
    browser.find_element(By.ID, "hold-address").send_keys("bob@client.test", Keys.ENTER)
    wait_for(lambda: "is in force" in browser.find_element(By.ID, "holds-status").text, 15,
             "the hold")
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#holds-table tbody tr")]
    assert any(r.startswith("case-7 a court's order bob@client.test") for r in rows), rows
    assert any(r.startswith("case-9 court held@client.test") for r in rows), rows
    browser.save_screenshot(str(shots / "09-holds.png"))
    browser.find_element(By.XPATH, "//button[.='Release case-7']").click()
    browser.switch_to.alert.accept()
    wait_for(lambda: "released" in browser.find_element(By.ID, "holds-status").text, 15,
             "the release")
    assert not browser.find_elements(By.XPATH, "//button[.='Release case-7']")

    # the audit log shows what the console did, as whom
    browser.find_element(By.CSS_SELECTOR, "nav button[data-view='audit']").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr"))
             > 5, 15, "the audit log")
    cells = _texts(browser, "#audit-table tbody td")
    assert "console:dpo@acme.test" in cells and "console.login" in cells
    assert "hold.release" in cells and "hold.place" in cells, cells
    browser.save_screenshot(str(shots / "10-audit.png"))
    for view, empty in (("requests", "No request has reached us."),
                        ("incidents", "No incident concerns your data.")):
        browser.find_element(By.CSS_SELECTOR, f"nav button[data-view='{view}']").click()
        wait_for(lambda v=view, e=empty: _texts(browser, f"#{v}-table tbody td") == [e], 15,
                 f"the {view}")

    # every field has a label, every button a name, and no view is wider than a laptop
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input')].filter(i => !i.labels.length)"
        ".map(i => i.id).concat([...document.querySelectorAll('button')]"
        ".filter(b => !b.textContent.trim()).map(b => b.id))")
    assert unlabelled == []
    for view in ("search", "person", "holds", "requests", "subprocessors", "incidents",
                 "audit"):
        browser.find_element(By.CSS_SELECTOR, f"nav button[data-view='{view}']").click()
        wait_for(lambda v=view: browser.find_element(
            By.ID, f"{v}-view").is_displayed(), 15, f"the view {view}")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= browser.execute_script("return window.innerWidth"), view

    # nothing the page did was refused by its own Content-Security-Policy
    logs = [e["message"] for e in browser.get_log("browser")]
    assert not [m for m in logs if "Content Security Policy" in m], logs

    browser.find_element(By.ID, "logout").click()
    _shown(browser, "#login-name")
    assert "logged out" in browser.find_element(By.ID, "error").text

"""The demo in a real browser (Debian's headless chromium, driven by Playwright): live banner, admin edits."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.demo.test_board import PROJECT, DemoServer
from tests.services import unavailable

CHROMIUM = "/usr/bin/chromium"
# What this machine's closed network needs: no background connections, no sandbox as root.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM) and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900)
    if not os.path.exists(CHROMIUM):
        unavailable(f"no chromium at {CHROMIUM}; install Debian's package: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is missing; pip install -e '.[test]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def create_staff(server):
    env = {**server.env, "DJANGO_SUPERUSER_PASSWORD": "staff-password"}
    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "staff", "--email", "s@x.invalid"],
        cwd=PROJECT, env=env, check=True, capture_output=True, timeout=60,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    server = DemoServer(tmp_path_factory.mktemp("demo"))
    create_staff(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """`make demo-distributed`: two workers on a PostgreSQL database of their own and the shared Redis."""
    import uuid

    import psycopg

    from tests.services import require_postgres, require_redis

    dsn = require_postgres()
    require_redis()
    database = f"djstm_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    env = {"DJANGO_SETTINGS_MODULE": "demo_site.settings_distributed", "DJSTM_DEMO_DATABASE": database}
    workers = []
    try:
        var = tmp_path_factory.mktemp("demo-distributed")
        workers.append(DemoServer(var, databases=("default",), **env))
        create_staff(workers[0])
        workers.append(DemoServer(var, databases=(), **env))
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def url(demo, path):
    return f"http://127.0.0.1:{demo.port}{path}"


def logged_in(browser, demo):
    context = browser.new_context()
    page = context.new_page()
    page.goto(url(demo, "/admin/login/"))
    page.fill("#id_username", "staff")
    page.fill("#id_password", "staff-password")
    page.click("input[type=submit]")
    page.wait_for_url(url(demo, "/admin/"))
    return context


@pytest.fixture
def staff(browser, demo):
    """A browser context logged in to the admin as staff."""
    context = logged_in(browser, demo)
    yield context
    context.close()


def open_banner_in_admin(context, demo):
    page = context.new_page()
    page.goto(url(demo, "/admin/djstm/dvarrecord/?q=banner"))
    page.click("#result_list a:text-is('banner')")
    page.wait_for_selector("#id_value")
    return page


def save_value(admin_page, json_text):
    admin_page.fill("#id_value", json_text)
    admin_page.click("input[name=_save]")
    admin_page.wait_for_load_state()


def visitor_page(browser, demo):
    page = browser.new_context().new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url(demo, "/"))
    page.wait_for_function("document.querySelector('#status').textContent.includes('live')", timeout=10_000)
    return page, dialogs


def test_a_change_saved_in_the_admin_appears_on_an_open_page_within_2_seconds(browser, demo, staff):
    from playwright.sync_api import expect

    page, _ = visitor_page(browser, demo)
    admin_page = open_banner_in_admin(staff, demo)
    save_value(admin_page, '"Half price until noon"')
    expect(page.locator("#banner")).to_have_text("Half price until noon", timeout=2000)


def test_html_in_a_value_shows_as_text_and_runs_nothing(browser, demo, staff):
    from playwright.sync_api import expect

    attack = "<img src=x onerror=alert(1)>"
    page, dialogs = visitor_page(browser, demo)
    admin_page = open_banner_in_admin(staff, demo)
    save_value(admin_page, f'"{attack}"')
    expect(page.locator("#banner")).to_have_text(attack, timeout=2000)
    assert page.locator("#banner img").count() == 0
    again = open_banner_in_admin(staff, demo)
    assert attack in again.locator(".field-pretty_value pre").inner_text()
    assert again.locator(".field-pretty_value img").count() == 0
    page.wait_for_timeout(300)
    assert dialogs == []


def test_two_admin_tabs_the_second_save_shows_the_conflict_and_the_first_value_stays(browser, demo, staff):
    first, second = open_banner_in_admin(staff, demo), open_banner_in_admin(staff, demo)
    save_value(first, '"First tab"')
    save_value(second, '"Second tab"')
    assert "changed by someone else" in second.content()
    assert '"First tab"' in open_banner_in_admin(staff, demo).locator(".field-pretty_value pre").inner_text()


def test_a_visitor_may_follow_the_banner_but_not_the_notes(browser, demo):
    page, _ = visitor_page(browser, demo)
    answer = page.evaluate(
        """() => new Promise((resolve) => {
            const socket = new WebSocket(`ws://${location.host}/ws/djstm/`);
            socket.onopen = () => socket.send(JSON.stringify({subscribe: [{store: "board", name: "notes"}]}));
            socket.onmessage = (message) => { resolve(JSON.parse(message.data)); socket.close(); };
            setTimeout(() => resolve({timeout: true}), 5000);
        })"""
    )
    assert "not allowed" in answer.get("error", ""), answer


def test_a_change_saved_on_one_worker_appears_on_a_page_of_the_other_within_2_seconds(browser, two_workers):
    from playwright.sync_api import expect

    first, second = two_workers
    page, _ = visitor_page(browser, second)
    admin = logged_in(browser, first)
    try:
        save_value(open_banner_in_admin(admin, first), '"Saved on the first worker"')
        expect(page.locator("#banner")).to_have_text("Saved on the first worker", timeout=2000)
        page.click("#click")  # and the board itself, changed on the second, shows on the first
        other, _ = visitor_page(browser, first)
        expect(other.locator("#clicks")).to_have_text("1", timeout=2000)
    finally:
        admin.close()


def test_a_form_rendered_by_one_worker_saves_on_the_other_when_nothing_changed(two_workers):
    """The admin's conflict check uses the stored version only: no state of the worker that drew the form."""
    import re
    import urllib.parse
    import urllib.request

    first, second = two_workers
    opener = first.opener  # one cookie jar for both workers: the session lives in the shared database

    def fetch(worker, path, fields=None):
        data = None
        if fields is not None:
            data = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": first._csrf()}).encode()
        request = urllib.request.Request(url(worker, path), data=data, headers={"Referer": url(worker, path)})
        with opener.open(request, timeout=10) as response:
            return response.geturl(), response.read().decode()

    fetch(first, "/admin/login/")
    fetch(first, "/admin/login/", {"username": "staff", "password": "staff-password", "next": "/admin/"})
    _, listing = fetch(first, "/admin/djstm/dvarrecord/?q=note_limit")
    change = re.search(r'href="(/admin/djstm/dvarrecord/\d+/change/)[^"]*">note_limit<', listing).group(1)
    _, form = fetch(first, change)
    loaded = re.search(r'name="loaded_version" value="(\d+)"', form).group(1)
    landed, page = fetch(second, change, {"value": "12", "loaded_version": loaded, "_save": "Save"})
    assert landed.endswith("/admin/djstm/dvarrecord/"), page[:2000]  # saved: back to the list
    _, shown = fetch(first, change)
    assert re.search(r'<pre>12</pre>', shown)


def test_the_live_script_fires_an_event_per_change_and_reconnects_after_a_restart(browser, tmp_path):
    from playwright.sync_api import expect

    server = DemoServer(tmp_path)
    create_staff(server)
    try:
        page, _ = visitor_page(browser, server)
        page.evaluate("window.changes = []; document.addEventListener('djstm:change', e => changes.push(e.detail))")
        admin = logged_in(browser, server)
        save_value(open_banner_in_admin(admin, server), '"Before the restart"')
        expect(page.locator("#banner")).to_have_text("Before the restart", timeout=2000)
        detail = page.evaluate("changes[changes.length - 1]")
        assert (detail["store"], detail["name"], detail["value"]) == ("board", "banner", "Before the restart")
        server.restart()
        admin.close()
        admin = logged_in(browser, server)
        save_value(open_banner_in_admin(admin, server), '"After the restart"')
        expect(page.locator("#banner")).to_have_text("After the restart", timeout=10_000)  # it reconnected
        admin.close()
    finally:
        server.stop()

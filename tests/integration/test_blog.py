"""The reference blog: pages, JSON API, health checks, and a browser posting through faults."""

from __future__ import annotations

import shutil
import threading
import time
import uuid

import pytest

from dropsafe._demo.blog import create_app, serve
from dropsafe._demo.scenario import SLOW_COMMIT

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def blog(postgres_server, chaos_proxy):
    app = create_app(chaos_proxy.route(postgres_server.url("psycopg2")), robust=True)
    postgres_server.execute(SLOW_COMMIT)
    yield app
    app.config["ENGINE"].dispose()


def _count(server, title):
    return int(server.execute(f"SELECT count(*) FROM blog_posts WHERE title = '{title}'")[0][0])


def test_pages_and_json_api(blog, postgres_server):
    client = blog.test_client()
    created = client.post("/api/posts", json={"title": "hello", "text": "world"})
    assert created.status_code == 201
    post_id = created.get_json()["id"]
    assert client.get(f"/api/posts/{post_id}").get_json()["text"] == "world"
    assert [p["title"] for p in client.get("/api/posts").get_json()] == ["hello"]
    form = client.post("/posts", data={"title": "from a form", "text": "x"})
    assert form.status_code == 303
    page = client.get(form.headers["Location"])
    assert b'<h1 id="title">from a form</h1>' in page.data
    assert b"from a form" in client.get("/").data
    assert client.post("/api/posts", json={"text": "no title"}).status_code == 400
    assert client.get("/api/posts/999999").status_code == 404
    assert _count(postgres_server, "hello") == 1


@pytest.mark.fault
def test_health_and_readiness(blog, chaos_proxy):
    client = blog.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    chaos_proxy.cut("rst")
    chaos_proxy.blackhole()
    started = time.monotonic()
    response = client.get("/readyz")
    waited = time.monotonic() - started
    chaos_proxy.heal()
    assert response.status_code == 503
    assert waited < 3, "readiness must answer within about a second"
    assert client.get("/healthz").status_code == 200


@pytest.mark.fault
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"
)
def test_a_browser_posts_once_through_cut_connections(blog, postgres_server, chaos_proxy):
    from selenium import webdriver  # noqa: PLC0415 - only this test needs a browser
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support import expected_conditions  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    web = serve(blog, port=0)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    title = f"post-{uuid.uuid4().hex[:8]}"
    # A COMMIT long enough for the watcher's polling to see it, however loaded the machine.
    postgres_server.execute(
        "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$"
    )
    try:
        base = f"http://127.0.0.1:{web.effective_port}"
        browser.get(base)
        chaos_proxy.cut("rst")  # the pooled connections die between requests

        fired = []

        def cut_during_commit():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if postgres_server.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' "
                    "AND state = 'active'"
                ):
                    fired.append(chaos_proxy.cut("rst"))
                    return

        watcher = threading.Thread(target=cut_during_commit, daemon=True)
        watcher.start()
        browser.find_element(By.NAME, "title").send_keys(title)
        browser.find_element(By.NAME, "text").send_keys("written while connections were cut")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # The post's page arrives after retries and a resolved COMMIT: wait for it, bounded.
        heading = (
            WebDriverWait(browser, 60)
            .until(expected_conditions.presence_of_element_located((By.ID, "title")))
            .text
        )
        watcher.join(timeout=20)
    finally:
        browser.quit()
        web.close()
    assert fired, "the COMMIT of the form's post was never cut"
    assert heading == title
    assert _count(postgres_server, title) == 1

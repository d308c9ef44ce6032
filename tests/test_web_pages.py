"""The chat page and the boards page in a real headless Chromium (Debian's, driven by
Playwright), against a real `dllama-api` over two real `dllama worker` processes: a streamed
reply, a reply stopped mid-way whose slot is free at once, three nodes with their figures, a
worker killed (down within 15 s, the engine told without a request) and restarted (up again).
Screenshots of both pages, at desktop and phone size, go to out/web/.

The server runs --parallel 1 --queue-size 1: a stopped reply that kept its slot would make the
next request wait or get 429.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from dllama.convert import convert
from dllama.testing.checkpoint import make_checkpoint
from test_api import API_KEY, _free_port, start_server, stop_server
from test_api_cluster import Worker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "out" / "web"
PHONE = {"width": 390, "height": 844}
DOWN_WITHIN_S = 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    hf = make_checkpoint(root / "hf", preset="tiny", arch="qwen3_moe", seed=2)
    model = root / "tiny-f32.m"
    convert(hf, model, weights="f32", progress=False)  # three nodes cut f32 slices (see test_api_cluster)
    key_file = root / "cluster-key"
    key_file.write_text("a cluster key for the web test, long enough\n")
    key_file.chmod(0o600)
    workers = [Worker(root / f"w{i}", _free_port(), key_file) for i in range(2)]
    srv = None
    try:
        for w in workers:
            w.root.mkdir()
            w.start()
        srv = start_server((hf, model), root, "--workers", *(f"127.0.0.1:{w.port}" for w in workers),
                           "--cluster-key-file", str(key_file), "--parallel", "1", "--queue-size", "1")
        yield srv, workers
    finally:
        if srv is not None and srv.process.poll() is None:
            stop_server(srv)
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def context(browser, cluster):
    """One browser profile for every test: the key, asked once, is remembered."""
    srv, _ = cluster
    ctx = browser.new_context(base_url=srv.url)
    try:
        yield ctx
    finally:
        ctx.close()


def open_page(context, path: str, key: str | None = None) -> Page:
    """A new tab at path; with `key`, the browser holds the API key already (as after the chat
    test asked for it), so a test does not depend on another having run first."""
    page = context.new_page()
    if key is not None:
        page.add_init_script(f"localStorage.setItem('dllama.apiKey', {json.dumps(key)})")
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the browser logs every 401 (the key being asked for) as an error: only other ones count
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 401" not in m.text
            else None)
    page.js_errors = errors
    page.goto(path)
    return page


def reply_text(page: Page) -> str:
    return page.locator(".message.assistant").last.locator(".markdown").inner_text()


def test_pages_are_open_with_a_strict_csp_and_the_api_is_not(cluster):
    srv, _ = cluster
    for path, kind in (("/", "text/html"), ("/cluster", "text/html"), ("/static/chat.js", "text/javascript")):
        r = httpx.get(srv.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert httpx.get(srv.url + "/static/../pages.py").status_code == 404
    assert httpx.get(srv.url + "/static/chat.html").status_code == 404  # pages only at their paths
    assert httpx.get(srv.url + "/v1/cluster").status_code == 401
    assert srv.http.get("/v1/cluster").status_code == 200


def test_chat_streams_a_reply_and_a_stopped_one_frees_its_slot_at_once(context, cluster):
    srv, _ = cluster
    page = open_page(context, "/")
    page.fill("#key-input", "a wrong key")  # asked at once: /v1/models needs the key
    page.click("#key-dialog button[type=submit]")
    expect(page.locator("#key-dialog p")).to_contain_text("refused")
    page.fill("#key-input", API_KEY)
    page.click("#key-dialog button[type=submit]")
    expect(page.locator("#model")).to_have_text("tiny")

    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "32")
    page.evaluate("""() => { window.replyUpdates = 0;
        new MutationObserver(() => window.replyUpdates++).observe(document.getElementById('messages'),
            {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    figures = page.locator(".message.assistant").last.locator(".figures")
    expect(figures).to_contain_text("tok/s", timeout=60_000)
    expect(figures).to_contain_text(re.compile(r"^32 tokens"))
    assert reply_text(page).strip()
    assert page.evaluate("window.replyUpdates") > 3  # drawn piece by piece, not at the end
    assert page.locator(".message.user").last.inner_text() == "Hello there"

    # a long reply, stopped once it has begun
    page.fill("#max-tokens", "1500")
    page.fill("#prompt", "Tell me everything")
    page.press("#prompt", "Enter")
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_function("() => document.querySelector('.message.assistant:last-child .markdown')"
                           ".textContent.length > 20", timeout=60_000)
    page.click("#stop")
    last = page.locator(".message.assistant").last
    expect(last.locator(".error")).to_have_text("Stopped.")
    deadline = time.monotonic() + 5
    while srv.health().json()["queue"]["running"]:
        assert time.monotonic() < deadline, "the stopped reply kept its slot"
        time.sleep(0.05)
    stopped_at = len(reply_text(page))
    page.screenshot(path=SHOTS / "chat.png")

    page.fill("#max-tokens", "8")
    page.fill("#prompt", "And now?")
    started = time.monotonic()
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant").last.locator(".figures")).to_contain_text("8 tokens", timeout=30_000)
    assert time.monotonic() - started < 20
    assert not page.locator(".message.assistant").last.locator(".error").count()
    assert len(page.locator(".message.assistant").nth(1).locator(".markdown").inner_text()) == stopped_at

    # the conversation survives a reload (localStorage), the key is not asked again
    page.reload()
    expect(page.locator(".message.assistant")).to_have_count(3)
    expect(page.locator("#model")).to_have_text("tiny")
    page.set_viewport_size(PHONE)
    page.screenshot(path=SHOTS / "chat-phone.png")
    assert page.js_errors == []


def test_model_text_is_drawn_as_text_never_as_html(context):
    page = open_page(context, "/", key=API_KEY)
    hostile = ("Hi <img src=x onerror=\"window.pwned=1\"> **bold** [x](javascript:window.pwned=2)\n\n"
               "```html\n<script>window.pwned=3</script>\n```\n- <b>item</b>")
    conversation = [{"id": "x", "title": "<b>t</b>", "messages": [
        {"role": "user", "content": "<i>me</i>"},
        {"role": "assistant", "content": hostile, "reasoning": "<svg onload=\"window.pwned=4\">", "done": True}]}]
    page.evaluate("c => localStorage.setItem('dllama.conversations', c)", json.dumps(conversation))
    page.reload()
    message = page.locator(".message.assistant")
    expect(message.locator("pre code")).to_have_text("<script>window.pwned=3</script>")
    assert message.locator("img, script, svg, b, a").count() == 0  # a javascript: link stays text
    assert message.locator("strong").inner_text() == "bold"
    assert "<img src=x" in message.locator(".markdown p").first.inner_text()
    assert page.locator(".message.user").inner_text() == "<i>me</i>"
    thinking = message.locator("details.thinking")  # folded apart from the answer
    assert thinking.get_attribute("open") is None and thinking.locator("summary").inner_text() == "Thinking"
    assert thinking.locator(".text").text_content() == "<svg onload=\"window.pwned=4\">"
    assert page.evaluate("window.pwned") is None
    page.evaluate("localStorage.removeItem('dllama.conversations')")


def test_boards_page_shows_every_node_and_follows_a_worker_down_and_back(context, cluster):
    srv, workers = cluster
    r = srv.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    assert r.status_code == 200  # decode steps for the plots
    page = open_page(context, "/cluster", key=API_KEY)
    rows = page.locator("#nodes tbody tr")
    expect(rows).to_have_count(3)
    for i in range(3):
        expect(rows.nth(i).locator(".state")).to_have_text("up")
    for i, address in enumerate(["root", *(f"127.0.0.1:{w.port}" for w in workers)]):
        row = rows.nth(i)
        assert row.get_attribute("data-address") == address
        for label in ("Load", "Engine memory", "Memory free"):  # what every Linux box has
            assert row.locator(f"td[data-label='{label}']").inner_text() != "n/a", (address, label)
        assert re.fullmatch(r"\d+ MB", row.locator("td[data-label='Engine memory']").inner_text())
        # this machine has no vcgencmd: "n/a", not "none"
        assert row.locator("td[data-label='Throttling now']").inner_text() == "n/a"
    expect(page.locator("#plots figure")).to_have_count(4)
    expect(page.locator("#plots figure").nth(1)).to_contain_text(re.compile(r"Decode \d"))  # the chat's steps
    page.screenshot(path=SHOTS / "cluster.png", full_page=True)

    metrics = httpx.get(srv.url + "/metrics").text
    for node in ("root", *(f"127.0.0.1:{w.port}" for w in workers)):
        assert f'dllama_node_up{{node="{node}"}} 1.0' in metrics
        assert re.search(rf'dllama_node_engine_rss_bytes{{node="{re.escape(node)}"}} \d', metrics)

    victim = workers[0]
    address = f"127.0.0.1:{victim.port}"
    row = page.locator(f"#nodes tbody tr[data-address='{address}']")
    victim.kill()
    killed = time.monotonic()
    expect(row.locator(".state")).to_have_text("down", timeout=DOWN_WITHIN_S * 1000)
    assert time.monotonic() - killed < DOWN_WITHIN_S
    # the engine learns it too, without a request having to fail first
    while srv.health().status_code == 200:
        assert time.monotonic() - killed < DOWN_WITHIN_S, "the host still thinks the cluster is whole"
        time.sleep(0.1)
    assert {"address": address, "up": False} in srv.health().json()["workers"]
    page.set_viewport_size(PHONE)
    page.screenshot(path=SHOTS / "cluster-down-phone.png", full_page=True)

    victim.start()
    expect(row.locator(".state")).to_have_text("up", timeout=30_000)
    assert srv.health().status_code == 200
    r = srv.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Back?"}],
                                                     "max_tokens": 4})
    assert r.status_code == 200, r.text  # the first request after the restart is served
    assert page.js_errors == []

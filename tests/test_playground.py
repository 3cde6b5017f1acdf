"""The web playground at / in a real browser: Playwright drives Debian's chromium (installed with apt by
the README's test command; Playwright's own browser download is never used) against a live server
with an API key, the real SmolLM2 and tiny random models (text and vision)."""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from audio_helpers import build_tiny_whisper
from conftest import LiveServer
from vision_helpers import png_bytes, random_image, vlm_repos

KEY = "playground-test-key"
CHROMIUM = "/usr/bin/chromium"
# Headless and offline: nothing in the browser may try to reach the internet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(smollm2_dir, tiny_repos, tmp_path_factory):
    vlm_repos(smollm2_dir, tmp_path_factory)
    build_tiny_whisper(tmp_path_factory.mktemp("whisper"))
    # SmolLM2 is preloaded (the default); the tiny models load when the page first picks them.
    srv = LiveServer("--api-key", KEY, "--num-kv-blocks", "256", "--max-num-batched-tokens", "64")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def requests_seen():
    return []


def open_page(browser, server, requests_seen, key: str | None = KEY, **context_options) -> Page:
    context = browser.new_context(**context_options)
    if key is not None:  # as if the user had typed the key earlier in this tab
        context.add_init_script(f"sessionStorage.setItem('transerve.apiKey', {key!r})")
    page = context.new_page()
    page.on("request", lambda request: requests_seen.append(request.url))
    page.goto(server.base_url + "/")
    return page


@pytest.fixture()
def page(browser, server, requests_seen):
    page = open_page(browser, server, requests_seen, viewport={"width": 1100, "height": 760})
    expect(page.locator("#model option")).not_to_have_count(0)
    yield page
    page.context.close()


def metric(server, name: str, **labels: str) -> float:
    """The sum of a metric's samples on /metrics whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.partition("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


def ask(page: Page, model: str, text: str, **settings) -> None:
    page.select_option("#model", model)
    if settings:
        if page.locator("#settings").is_hidden():
            page.click("#toggle-settings")
        for name, value in settings.items():
            page.fill(f"#{name}", str(value))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_done(page: Page) -> None:
    expect(page.locator("#send")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)


def last_answer(page: Page):
    return page.locator(".message.assistant").last


def test_a_question_streams_a_markdown_answer_with_its_speed(page, server, requests_seen, tmp_path):
    # Record every length the answer's text goes through: a streamed answer grows in steps.
    page.evaluate("""() => {
        window.seenLengths = new Set();
        new MutationObserver(() => {
            const body = document.querySelector('.message.assistant:last-of-type .body');
            if (body) window.seenLengths.add(body.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, "SmolLM2-135M-Instruct", "What is the capital of France?", temperature=0, max_tokens=40)
    wait_done(page)
    answer = last_answer(page)
    expect(answer.locator(".body")).to_contain_text("Paris")
    expect(answer.locator(".meta")).to_contain_text("tok/s")
    expect(answer.locator(".meta")).to_contain_text("TTFT")
    assert len([n for n in page.evaluate("[...window.seenLengths]") if n > 0]) >= 3  # it arrived in pieces
    expect(page.locator(".message.user .user-text")).to_have_text("What is the capital of France?")
    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    # Everything the page loaded came from the server itself (inline data: URLs aside).
    origins = {f"{u.scheme}://{u.netloc}" for u in map(urlsplit, requests_seen) if u.scheme != "data"}
    assert origins == {server.base_url}, origins


def test_a_json_schema_constrains_the_answer_and_a_bad_one_shows_the_servers_error(page):
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False}
    ask(page, "tiny/llama", "Name a city.", temperature=1, max_tokens=60, json_schema=json.dumps(schema))
    wait_done(page)
    answer = json.loads(last_answer(page).locator(".body").inner_text())
    assert set(answer) == {"city", "rank"} and 1 <= answer["rank"] <= 9  # from a random-weight model
    ask(page, "tiny/llama", "Again.", json_schema='{"type": "object", "properties": ')
    wait_done(page)
    expect(page.locator(".message.assistant").last).to_contain_text("response_format")


def test_stop_mid_stream_ends_the_request_on_the_server(page, server):
    aborted = metric(server, "transerve_requests_finished_total", model="tiny/llama", reason="abort")
    ask(page, "tiny/llama", "Tell me a very long story.", max_tokens=900)
    expect(last_answer(page).locator(".body")).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
    assert metric(server, "transerve_num_requests_running") >= 1
    page.click("#stop")
    deadline = time.monotonic() + 10
    while metric(server, "transerve_num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "transerve_num_requests_running") == 0
    # It ended because the page hung up, not because it ran to its 900 tokens.
    assert metric(server, "transerve_requests_finished_total", model="tiny/llama", reason="abort") == aborted + 1
    expect(last_answer(page).locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#status-running")).to_have_text("running 0", timeout=10_000)  # the page's status strip
    expect(page.locator("#send")).to_be_visible()


def test_answers_render_markdown_thinking_and_tool_calls_without_injecting_html(page):
    text = 'Some **bold** and `a<b>` code\n\n- one\n- *two*\n\n```python\nprint("<script>")\n```\n<img src=x onerror=alert(1)>'
    html = page.evaluate("""async (text) => (await import('/playground/markdown.js')).renderMarkdown(text)""", text)
    assert "<strong>bold</strong>" in html and "<code>a&lt;b&gt;</code>" in html
    assert "<ul><li>one</li><li><em>two</em></li></ul>" in html
    assert '<pre><code class="language-python">print(&quot;&lt;script&gt;&quot;)</code></pre>' in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    shown = page.evaluate("""async () => {
        const {messageElement} = await import('/playground/view.js');
        const element = messageElement({role: 'assistant', text: 'Checking.', reasoning: 'The user wants the weather.',
            toolCalls: [{id: 'call_1', type: 'function', function: {name: 'get_weather', arguments: '{"city": "Paris"}'}}]});
        document.getElementById('messages').append(element);
        const thinking = element.querySelector('details.thinking');
        return {open: thinking.open, hidden: thinking.hidden, thinking: thinking.textContent,
                calls: element.querySelector('.tool-calls pre').textContent};
    }""")
    assert shown["hidden"] is False and shown["open"] is False  # thinking is there, collapsed
    assert "The user wants the weather." in shown["thinking"]
    assert json.loads(shown["calls"])[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_another_model_answers_when_picked_and_turns_can_be_regenerated_or_edited(page):
    ask(page, "tiny/qwen2", "Hello there", max_tokens=6, seed=1)
    wait_done(page)
    expect(last_answer(page).locator(".meta")).to_contain_text("tiny/qwen2")
    page.get_by_role("button", name="Regenerate").click()
    wait_done(page)
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(last_answer(page).locator(".meta")).to_contain_text("tok/s")
    page.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("Hello again")
    page.get_by_role("button", name="Send", exact=True).first.click()
    wait_done(page)
    expect(page.locator(".message.user .user-text")).to_have_text(["Hello again"])
    expect(page.locator(".message.assistant")).to_have_count(1)


def test_an_image_attached_by_picker_or_paste_reaches_a_vision_model(page, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(png_bytes(random_image(3, (80, 60))))
    page.select_option("#model", "tiny/qwen2-vl")
    page.set_input_files("#attach", str(image))
    expect(page.locator("#attachments img")).to_have_count(1)
    ask(page, "tiny/qwen2-vl", "What is in this picture?", max_tokens=8)
    wait_done(page)
    expect(page.locator(".message.user img.thumb")).to_have_count(1)
    expect(last_answer(page).locator(".body")).not_to_be_empty()
    expect(last_answer(page).locator(".message-error")).to_have_count(0)
    # A pasted image becomes an attachment too.
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", base64.b64encode(image.read_bytes()).decode())
    expect(page.locator("#attachments img")).to_have_count(1)
    ask(page, "tiny/qwen2-vl", "And this one?", max_tokens=8)
    wait_done(page)
    expect(page.locator(".message.user img.thumb")).to_have_count(2)
    expect(last_answer(page).locator(".message-error")).to_have_count(0)


def test_an_audio_file_is_transcribed_when_a_whisper_model_is_picked(page, tmp_path):
    import numpy as np
    import soundfile

    audio = tmp_path / "note.wav"
    soundfile.write(audio, np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32), 16_000)
    page.select_option("#model", "tiny/whisper")
    expect(page.locator("#attach-text")).to_have_text("Attach audio")
    page.set_input_files("#attach", str(audio))
    expect(page.locator("#attachments")).to_contain_text("note.wav")
    page.click("#send")
    wait_done(page)
    expect(page.locator(".message.user")).to_contain_text("Audio: note.wav")
    expect(last_answer(page).locator(".meta")).to_contain_text("tiny/whisper")
    expect(last_answer(page).locator(".message-error")).to_have_count(0)


def test_reload_finds_the_conversation_kept(page):
    ask(page, "tiny/llama", "Remember this conversation", max_tokens=4, temperature=0.5)
    wait_done(page)
    page.reload()
    expect(page.locator(".message.user .user-text")).to_have_text(["Remember this conversation"])
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(page.locator(".conversation[aria-current=true]")).to_have_text("Remember this conversation")
    expect(page.locator("#model")).to_have_value("tiny/llama")
    expect(page.locator("#temperature")).to_have_value("0.5")


def test_a_wrong_api_key_shows_the_servers_error(browser, server, requests_seen):
    page = open_page(browser, server, requests_seen, key=None)
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("You didn't provide an API key")
    page.get_by_label("This server needs an API key").fill("not-the-key")
    page.get_by_role("button", name="Use key").click()
    expect(dialog).to_contain_text("Incorrect API key provided.")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("alert").first).to_contain_text("Incorrect API key provided.")
    expect(page.get_by_role("textbox", name="Message", exact=True)).to_be_visible()  # the page is there, not blank
    page.reload()
    page.get_by_label("This server needs an API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#model option")).not_to_have_count(0)
    page.context.close()


def test_phone_width_fits_the_screen_and_follows_the_dark_setting(browser, server, requests_seen):
    page = open_page(browser, server, requests_seen, viewport={"width": 390, "height": 800}, has_touch=True,
                     color_scheme="dark")
    expect(page.locator("#model option")).not_to_have_count(0)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(page.locator("#send")).to_be_in_viewport()
    expect(page.locator("#new-chat")).not_to_be_in_viewport()
    page.get_by_role("button", name="Conversations").click()
    expect(page.locator("#new-chat")).to_be_in_viewport()
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(21, 23, 27)"
    page.context.close()


def test_the_page_needs_no_key_but_the_api_does(server):
    page = httpx.get(server.base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(server.base_url + "/playground/app.js").status_code == 200
    assert httpx.get(server.base_url + "/v1/models").status_code == 401


def test_no_playground_leaves_root_a_404():
    srv = LiveServer("--no-preload", "--no-playground", "--api-key", KEY)
    try:
        for path in ("/", "/playground/app.js"):
            response = httpx.get(srv.base_url + path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
    finally:
        assert srv.stop() == 0, srv.output()

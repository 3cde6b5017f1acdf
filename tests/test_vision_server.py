"""Images through a live server with the openai SDK: data URLs, http URLs from a local server, a
concurrent mixed batch, the prefix cache with different images, Responses' input_image, and bad media."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from transformers import AutoTokenizer

from conftest import LiveServer, free_port
from transerve.media.images import MAX_IMAGE_BYTES
from vision_helpers import (
    Prompt, data_url, hf_greedy_with_images, png_bytes, random_image, reference_model, template_parts, vlm_repos,
)

FAMILIES = ["tiny/qwen2-vl", "tiny/llava"]
QUESTION = "What is in this picture?"


class ImageFiles(BaseHTTPRequestHandler):
    """What the test's own web server serves: an image, a text file, a body over the limit, 404s."""

    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/huge.png":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\0" * (1024 * 1024)
            for _ in range(MAX_IMAGE_BYTES // len(chunk) + 2):
                try:
                    self.wfile.write(chunk)
                except OSError:  # the server under test hung up, as it should
                    return
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_site():
    ImageFiles.files = {"/cat.png": png_bytes(random_image(20, (120, 100))), "/notes.txt": b"not an image at all"}
    site = ThreadingHTTPServer(("127.0.0.1", 0), ImageFiles)
    site.protocol_version = "HTTP/1.0"
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


@pytest.fixture(scope="module")
def repos(smollm2_dir, tmp_path_factory, tiny_repos):
    return vlm_repos(smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def references(repos):
    return {repo: reference_model(path) for repo, path in repos.items()}


@pytest.fixture(scope="module")
def server(repos):
    # 16 tokens a step: image prompts are prefilled in chunks here too.
    live = LiveServer("--no-preload", "--num-kv-blocks", "256", "--max-num-batched-tokens", "16")
    yield live
    assert live.stop() == 0, live.output()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def expected_text(repos, references, repo: str, prompt: Prompt, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(repos[repo])
    return tokenizer.decode(hf_greedy_with_images(references[repo], prompt, max_tokens), skip_special_tokens=True)


def ask(client, repo: str, url: str | None, text: str = QUESTION, max_tokens: int = 10):
    content = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    return client.chat.completions.create(model=repo, messages=messages, temperature=0, max_tokens=max_tokens)


@pytest.mark.parametrize("repo", FAMILIES)
def test_data_url_image_matches_generate(client, repos, references, repo):
    image = random_image(7, (90, 110))
    prompt = Prompt(repos[repo], references[repo], template_parts(QUESTION, 1), (image,))
    reply = ask(client, repo, data_url(image))
    assert reply.choices[0].message.content == expected_text(repos, references, repo, prompt, 10)
    assert reply.usage.prompt_tokens == len(prompt.ids)


def test_image_from_an_http_url_matches_generate(client, repos, references, image_site):
    repo = "tiny/qwen2-vl"
    prompt = Prompt(repos[repo], references[repo], template_parts(QUESTION, 1), (random_image(20, (120, 100)),))
    reply = ask(client, repo, image_site + "/cat.png")
    assert reply.choices[0].message.content == expected_text(repos, references, repo, prompt, 10)


@pytest.mark.parametrize("repo", FAMILIES)
def test_concurrent_image_and_text_requests_each_match_generate(client, repos, references, repo):
    images = [random_image(30 + i, size) for i, size in enumerate([(64, 64), (150, 100), (100, 150)])]
    jobs = [(data_url(img), f"Question {i} about the image?") for i, img in enumerate(images)]
    jobs += [(None, "Tell me a story about a lighthouse."), (None, "Hi")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: ask(client, repo, job[0], job[1], 12), jobs))
    for (url, text), image_or_none, reply in zip(jobs, images + [None, None], replies):
        if image_or_none is None:
            prompt = Prompt(repos[repo], references[repo], [{"role": "user", "content": text}])
        else:
            prompt = Prompt(repos[repo], references[repo], template_parts(text, 1), (image_or_none,))
        assert reply.choices[0].message.content == expected_text(repos, references, repo, prompt, 12), text


def test_text_only_conversation_keeps_every_turn_with_a_parts_only_template(client, repos, references):
    """llava-hf's templates render content parts only: plain-string turns (system, assistant history)
    must reach the model as text parts, not vanish from the prompt."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    reply = client.chat.completions.create(model="tiny/llava", messages=messages, temperature=0, max_tokens=8)
    prompt = Prompt(repos["tiny/llava"], references["tiny/llava"], messages)
    assert all(m["content"] in prompt.text for m in messages)
    assert reply.choices[0].message.content == expected_text(repos, references, "tiny/llava", prompt, 8)


def test_prefix_cache_does_not_mix_up_images_of_the_same_size(client, repos, references):
    repo = "tiny/qwen2-vl"
    text = "Describe this image in great detail, please, with many words about all you can see in it. " * 2
    first, other = random_image(40, (150, 150)), random_image(41, (150, 150))
    prompts = [Prompt(repos[repo], references[repo], template_parts(text, 1), (img,)) for img in (first, other)]
    assert prompts[0].ids == prompts[1].ids
    offset = prompts[0].multimodal.images[0].offset
    replies = [ask(client, repo, data_url(img), text) for img in (first, other, first)]
    assert replies[0].choices[0].message.content == expected_text(repos, references, repo, prompts[0], 10)
    assert replies[1].choices[0].message.content == expected_text(repos, references, repo, prompts[1], 10)
    assert replies[1].usage.prompt_tokens_details.cached_tokens <= offset  # no block holding the other image
    assert replies[2].choices[0].message.content == replies[0].choices[0].message.content
    assert replies[2].usage.prompt_tokens_details.cached_tokens > offset + prompts[0].multimodal.images[0].length


def test_responses_input_image_matches_generate(client, repos, references):
    repo = "tiny/llava"
    image = random_image(50, (80, 60))
    prompt = Prompt(repos[repo], references[repo], template_parts(QUESTION, 1), (image,))
    response = client.responses.create(model=repo, temperature=0, max_output_tokens=10, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": data_url(image)}, {"type": "input_text", "text": QUESTION}],
    }])
    assert response.output_text == expected_text(repos, references, repo, prompt, 10)


def test_bad_media_is_a_400_naming_the_problem_and_the_server_keeps_serving(client, image_site):
    dead_port = free_port()  # nothing listens there
    text_file = "data:image/png;base64," + base64.b64encode(b"plain text, not a PNG").decode()
    cases = [
        ("tiny/qwen2-vl", text_file, "not an image"),
        ("tiny/qwen2-vl", "data:image/png;base64,@@@not base64@@@", "base64"),
        ("tiny/qwen2-vl", image_site + "/notes.txt", "not an image"),
        ("tiny/qwen2-vl", image_site + "/missing.png", "HTTP 404"),
        ("tiny/qwen2-vl", f"http://127.0.0.1:{dead_port}/cat.png", "could not fetch"),
        ("tiny/qwen2-vl", image_site + "/huge.png", "larger than this server's limit"),
        ("tiny/qwen2-vl", "file:///etc/passwd", "data:, http: or https:"),
        ("tiny/llama", data_url(random_image(1)), "does not accept images"),
    ]
    for repo, url, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            ask(client, repo, url)
        error = info.value.body
        assert info.value.status_code == 400
        assert words in error["message"], (url[:60], error)
        assert error["type"] == "invalid_request_error" and error["param"].startswith("messages[0].content[0]")
    assert ask(client, "tiny/qwen2-vl", image_site + "/cat.png").choices[0].message.content is not None
    assert ask(client, "tiny/llama", None, "Hi", 3).choices[0].finish_reason in ("stop", "length")

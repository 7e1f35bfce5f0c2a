"""`python -m mlx_longheads.server`, started once on the embedded model and spoken to with
the `openai` client, as an app would; and the mlx-lm code it hooks into, pinned."""

import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm import server as mlx_lm_server
from mlx_lm.models import cache as mlx_lm_cache

from conftest import assert_one_line_error, run_module, tiny_model
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.models import apply_longheads
from mlx_longheads.server import LongHeadsPromptCache, build_parser

# Small LongHeads sizes: past 512 tokens each head selects 8 chunks of 32.
CHUNK = 32
SERVER_FLAGS = [
    "--max-context", "4096", "--chunk-size", str(CHUNK), "--attention-length", "256",
    "--full-attention-length", "512", "--prefill-step-size", "512", "--max-tokens", "16",
]
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"  # what GET /v1/models names the embedded model
# About 2,100 tokens with the chat template: four times the full attention length.
DOCUMENT = "Alice keeps a red bicycle in the garden shed. " + (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 100
)
QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server's base URL; it runs for the whole module, on a machine without a
    Hugging Face cache (mlx-lm's /v1/models fails there)."""
    port = free_port()
    env = dict(os.environ, HF_HOME=str(tmp_path_factory.mktemp("no-hf-cache")), HF_HUB_OFFLINE="1")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlx_longheads.server", "--port", str(port), *SERVER_FLAGS],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    assert json.load(response) == {"status": "ok"}
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=600)


def post(url: str, body: bytes):
    """(status, JSON body) of a raw POST: for what the openai client would not send."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)


def ask(question: str):
    return [{"role": "user", "content": question}]


def test_models_lists_the_served_model_as_json_without_a_hugging_face_cache(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_a_chat_completion(client):
    response = chat(client, ask(QUESTION), max_tokens=8)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 10 and 1 <= response.usage.completion_tokens <= 8


def test_a_streamed_chat_completion_reports_usage_at_the_end(client):
    chunks = list(chat(client, ask(QUESTION), max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_a_text_completion(client):
    response = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=4)
    assert response.choices[0].text and response.usage.prompt_tokens > 3


def test_a_document_is_prefilled_once_over_a_conversation(client):
    """Turn 1 reads the document (streamed: keep-alives come during its prefill); turn
    2 resends it with turn 1, as every client does, and prefills only the new tokens;
    turn 3 replaces the assistant's answer, so the cache is cut back into what it holds
    (to at most a chunk before the cut) instead of reading the document again."""
    messages = [{"role": "system", "content": DOCUMENT}, *ask("What does Alice keep in the shed?")]
    with client.chat.completions.with_streaming_response.create(
        model=MODEL_ID, messages=messages, stream=True, stream_options={"include_usage": True},
    ) as response:
        lines = list(response.iter_lines())
    keepalives = [line for line in lines if line.startswith(": keepalive")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    first = events[-1]["usage"]
    assert first["prompt_tokens"] > 2000 and first["prompt_tokens_details"]["cached_tokens"] < 100
    assert len(keepalives) >= first["prompt_tokens"] // 512  # one per prefill step of 512
    answer = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

    messages += [{"role": "assistant", "content": answer}, *ask("And what colour is it?")]
    second = chat(client, messages).usage
    assert second.prompt_tokens_details.cached_tokens >= first["prompt_tokens"]
    assert second.prompt_tokens - second.prompt_tokens_details.cached_tokens < 50

    messages[2]["content"] = "Zebras."
    third = chat(client, messages).usage
    assert third.prompt_tokens_details.cached_tokens >= first["prompt_tokens"] - CHUNK
    assert third.prompt_tokens - third.prompt_tokens_details.cached_tokens < 50 + CHUNK


def test_concurrent_requests_are_all_answered(client):
    questions = [QUESTION, "Name a colour.", "What is 2 + 2?", "Say hello."]
    with ThreadPoolExecutor(len(questions)) as pool:
        responses = list(pool.map(lambda q: chat(client, ask(q), max_tokens=6), questions))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in responses)
    assert all(r.usage.completion_tokens >= 1 for r in responses)


def test_bad_requests_get_a_json_error_and_the_server_stays_up(client, server):
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        chat(client, [])
    with pytest.raises(openai.BadRequestError, match=r"the prompt has \d{4} tokens, more than this server's --max-context 4096"):
        chat(client, ask(DOCUMENT * 2))
    with pytest.raises(openai.NotFoundError, match=f"model 'gpt-4' is not served here: ask for '{MODEL_ID}'"):
        client.chat.completions.create(model="gpt-4", messages=ask(QUESTION))
    with pytest.raises(openai.BadRequestError, match="cannot be tokenized"):
        chat(client, [{"content": "a message without a role"}])
    status, body = post(f"{server}/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "Invalid JSON" in body["error"]
    status, body = post(f"{server}/v1/chat/completions", b'{"model": "default_model"}')
    assert status == 400 and "messages" in body["error"]
    with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
        assert json.load(response) == {"status": "ok"}
    assert chat(client, ask(QUESTION), max_tokens=2).usage.completion_tokens >= 1


def test_the_memory_check_runs_before_the_server_starts():
    result = run_module("mlx_longheads.server", "--max-context", "1024m", "--port", str(free_port()))
    assert_one_line_error(result, "this run needs about", "lower --max-context")


def test_the_flags_are_mlx_lm_servers_and_longheads():
    args = build_parser().parse_args(["--prompt-cache-size", "3", "--chat-template-args", '{"a": 1}', "--max-context", "32k"])
    assert (args.prompt_cache_size, args.chat_template_args, args.max_context) == (3, {"a": 1}, 32768)
    assert (args.attention, args.port, args.kv_group_size) == ("longheads", 8080, None)


def test_the_prompt_cache_store_continues_where_a_trimmed_cache_ends():
    """mlx-lm's store trims a longer cached conversation to the prefix a request shares
    with it, and takes the rest of the prompt from there; a LongHeads cache may cut
    further back (to its chunk's start), and the rest then starts where it ends."""
    model = tiny_model("llama")
    apply_longheads(model, LongHeadsConfig(chunk_size=8, attention_length=64, full_attention_length=64))
    cached = [int(t) for t in np.random.default_rng(0).integers(0, 97, size=150)]
    cache = model.make_cache()
    model(mx.array(cached)[None], cache=cache)
    store = LongHeadsPromptCache()
    store.insert_cache("m", cached, cache)
    # Chunks 16 and 17 (tokens 128-143) are the last complete ones: cuts there and in the
    # incomplete chunk 18 are exact; one in chunk 12 goes back to its start, 96.
    for shared, start in ((147, 147), (140, 140), (130, 130), (100, 96)):
        request = cached[:shared] + [1000, 1000]  # a token the cached prompt does not have
        fetched, rest = store.fetch_nearest_cache("m", request)
        assert fetched[0].offset == start and rest == request[start:]
    assert store.fetch_nearest_cache("m", cached + [1000])[0][0].offset == 150  # kept whole


# The mlx-lm 0.32.2 code the server hooks into or relies on, by a hash of its source.
PINNED = {
    "server.main": "747b1f39c7f17ad7",  # build_parser takes its parser
    "server._run_http_server": "a95fdf1d166a42df",  # takes the handler class
    "server.ModelProvider.__init__": "ce004e49ee2cfc85",  # the model and adapter maps
    "server.ModelProvider._load": "24ae8377c256c9e7",  # loads with mlx_lm.load, sets is_batchable
    "server.ModelProvider.load": "815a086cc705ac41",  # maps a request's model name
    "server.ResponseGenerator._generate": "3a4259353eae5341",  # unbatchable: _serve_single
    "server.ResponseGenerator._tokenize": "85879c0b95a42782",  # called by the handler's checks
    "server.ResponseGenerator._serve_single": "90f0dd09755378d4",  # fetch, count, insert
    "server.APIHandler.do_POST": "8bd4d3050d331a62",  # sets the request fields, then handle_completion
    "server.APIHandler.do_GET": "6112bfedf9583cb6",  # /v1/models -> handle_models_request
    "server.APIHandler.handle_completion": "90c9f5f662e952e5",  # keep-alives, usage
    "cache.LRUPromptCache.fetch_nearest_cache": "7ac872d0c1091796",  # trims, ignores the count
    "cache.LRUPromptCache.insert_cache": "49c194f3fcf8831e",  # drops the prefixes of trimmable caches
    "cache.trim_prompt_cache": "bec42e4c80295bcd",  # returns the first layer's count
}


@pytest.mark.parametrize("name", PINNED)
def test_the_mlx_lm_code_the_server_hooks_into_is_unchanged(name):
    module, _, attribute = name.partition(".")
    source = {"server": mlx_lm_server, "cache": mlx_lm_cache}[module]
    for part in attribute.split("."):
        source = getattr(source, part)
    digest = hashlib.sha256(inspect.getsource(source).encode()).hexdigest()[:16]
    assert digest == PINNED[name], (
        f"mlx-lm's {name} changed: check how mlx_longheads/server.py relies on it "
        "(the comment beside its hash), then pin the new hash"
    )

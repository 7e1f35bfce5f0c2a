"""`python -m mlx_longheads.server`, started on the embedded model and spoken to with the
`openai` client, as an app would; and the mlx-lm code it hooks into, pinned."""

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
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm import server as mlx_lm_server
from mlx_lm.models import cache as mlx_lm_cache

from conftest import ROUNDING, assert_one_line_error, run_main, run_module, tiny_model
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.models import apply_longheads
from mlx_longheads.server import LongHeadsPromptCache, build_parser
from mlx_longheads.server import main as server_main

# Small LongHeads sizes, so that a short document crosses them: stock attention up to
# F = 128 tokens, past it each head selects 4 chunks of 16.
CHUNK, FULL_ATTENTION_LENGTH, PREFILL_STEP, MAX_CONTEXT = 16, 128, 64, 384
SERVER_FLAGS = [
    "--max-context", str(MAX_CONTEXT), "--chunk-size", str(CHUNK), "--attention-length", "64",
    "--full-attention-length", str(FULL_ATTENTION_LENGTH),
    "--prefill-step-size", str(PREFILL_STEP), "--max-tokens", "8",
]
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"  # what GET /v1/models names the embedded model
# About 177 tokens with the chat template: past F by three chunks.
DOCUMENT = "Alice keeps a red bicycle in the garden shed. " + (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 6
)
QUESTION = "What is the capital of France?"


def free_port() -> int:
    """A port nothing listens on now (something may take it before the server binds it:
    `serving` then tries another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(tmp_path_factory, *flags: str, attempts: int = 5):
    """A server with these flags, on a machine without a Hugging Face cache (mlx-lm's
    /v1/models fails there): its base URL once /health answers. The port is picked
    free, then bound by the server after it loads; a server that finds it taken in
    between exits saying it cannot listen, and another port is tried."""
    env = dict(os.environ, HF_HOME=str(tmp_path_factory.mktemp("no-hf-cache")), HF_HUB_OFFLINE="1")
    for _ in range(attempts):
        port = free_port()
        log = tmp_path_factory.mktemp("server") / "server.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlx_longheads.server", "--port", str(port), *flags],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if json.load(response) == {"status": "ok"} and process.poll() is None:
                            break
                except (OSError, ValueError):
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.25)
            else:
                assert f"cannot listen on 127.0.0.1:{port}" in log.read_text(), log.read_text()
                continue  # the port was taken: another one
            yield url
            return
        finally:
            process.terminate()
            process.wait(timeout=30)
    raise AssertionError(f"no free port in {attempts} attempts")


def openai_client(url: str, timeout: float = 600) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_folder):
    """The base URL of the server the module shares (LongHeads, SERVER_FLAGS)."""
    with serving(tmp_path_factory, *SERVER_FLAGS) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


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


def greedy(client, messages, max_tokens: int = 6):
    """A greedy answer (temperature 0) with the two most likely tokens of each step."""
    return chat(client, messages, max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=2)


def margins(response) -> np.ndarray:
    """Each step's top-1 minus top-2 logit (log-probabilities differ as the logits do)."""
    top2 = [sorted(t.logprob for t in step.top_logprobs) for step in response.choices[0].logprobs.content]
    return np.array([b - a for a, b in top2])


def text(response) -> str:
    return response.choices[0].message.content


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
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_a_text_completion(client):
    response = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=4)
    assert response.choices[0].text and response.usage.prompt_tokens > 3


def test_a_document_is_prefilled_once_over_a_conversation(client):
    """Turn 1 reads the document, past F (streamed: keep-alives come during its
    prefill); turn 2 resends it with turn 1, as every client does, and prefills only
    the new tokens; turn 3 replaces the assistant's answer, so the cache is cut back
    into what it holds (to at most a chunk before the cut) instead of reading the
    document again."""
    messages = [{"role": "system", "content": DOCUMENT}, *ask("What does Alice keep in the shed?")]
    with client.chat.completions.with_streaming_response.create(
        model=MODEL_ID, messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True},
    ) as response:
        lines = list(response.iter_lines())
    keepalives = [line for line in lines if line.startswith(": keepalive")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    first = events[-1]["usage"]
    assert first["prompt_tokens"] > FULL_ATTENTION_LENGTH + 2 * CHUNK
    assert first["prompt_tokens_details"]["cached_tokens"] < CHUNK  # earlier requests share a few
    assert len(keepalives) >= first["prompt_tokens"] // PREFILL_STEP  # one per prefill step
    answer = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

    messages += [{"role": "assistant", "content": answer}, *ask("And what colour is it?")]
    second = chat(client, messages, max_tokens=4).usage
    assert second.prompt_tokens_details.cached_tokens >= first["prompt_tokens"]
    assert second.prompt_tokens - second.prompt_tokens_details.cached_tokens < 50

    messages[2]["content"] = "Zebras."
    third = chat(client, messages, max_tokens=4).usage
    assert third.prompt_tokens_details.cached_tokens >= first["prompt_tokens"] - CHUNK
    assert third.prompt_tokens - third.prompt_tokens_details.cached_tokens < 50 + CHUNK


def test_concurrent_requests_each_get_the_answer_they_get_alone(client):
    """Requests sent at once are answered as when each is sent alone (greedy: the same
    text, every step winning by more than twice what the prompt cache's different
    split of the prompt can move the logits)."""
    questions = [QUESTION, "Name a colour.", "What is 2 + 2?"]
    alone = [greedy(client, ask(q), max_tokens=4) for q in questions]
    for response in alone:
        assert margins(response).min() > 2 * ROUNDING, (text(response), margins(response))
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda q: greedy(client, ask(q), max_tokens=4), questions))
    assert [text(r) for r in together] == [text(r) for r in alone]
    assert all(r.usage.completion_tokens >= 1 for r in together)


def test_a_second_turn_from_the_prompt_cache_answers_as_a_fresh_server_does(client, tmp_path_factory):
    """Turn 2 continues from the cache turn 1 left (its prompt counted as cached) and
    gives the answer a server that never saw turn 1 gives to the same two turns: the
    same text and each step's log-probability within the rounding, every step winning
    by more than twice it. Below F, where a prefill and a decode compute alike (past
    it a fresh prefill lets each chunk of the answer share a selection, which decoding
    it did not)."""
    messages = ask("Name the largest planet.")
    first = chat(client, messages, max_tokens=6, temperature=0.0)
    messages += [{"role": "assistant", "content": text(first)}, *ask("And the smallest?")]
    cached = greedy(client, messages)
    assert cached.usage.prompt_tokens + cached.usage.completion_tokens <= FULL_ATTENTION_LENGTH
    assert cached.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    with serving(tmp_path_factory, *SERVER_FLAGS) as url:
        fresh = greedy(openai_client(url), messages)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert margins(fresh).min() > 2 * ROUNDING, (text(fresh), margins(fresh))
    assert text(cached) == text(fresh)
    chosen = [[step.logprob for step in r.choices[0].logprobs.content] for r in (cached, fresh)]
    np.testing.assert_allclose(*chosen, atol=ROUNDING)


def test_a_client_that_disconnects_mid_stream_leaves_the_server_serving(server, client):
    """A streamed completion whose client goes away after the first tokens: the server
    stops generating for it (its 360 tokens would take minutes here) and answers the
    next request."""
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL_ID, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 360, "stream": True})
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        received = b""
        while b"data: {" not in received:
            data = connection.recv(4096)
            assert data, received
            received += data
    assert received.split(b"\r\n")[0].split()[1] == b"200"
    answered = chat(openai_client(server, timeout=60), ask(QUESTION), max_tokens=2)
    assert answered.usage.completion_tokens >= 1 and text(answered)


def test_full_attention_serves_a_request_as_longheads_does_below_f(client, tmp_path_factory):
    """--attention full: mlx-lm's stock attention (and its batches). Below F LongHeads
    is stock attention, so both give the same greedy answer, every step winning by more
    than twice the rounding between them."""
    with serving(tmp_path_factory, *SERVER_FLAGS, "--attention", "full") as url:
        full = greedy(openai_client(url), ask(QUESTION), max_tokens=6)
    assert full.usage.prompt_tokens < FULL_ATTENTION_LENGTH
    assert margins(full).min() > 2 * ROUNDING, (text(full), margins(full))
    assert text(full) == text(greedy(client, ask(QUESTION), max_tokens=6)) and "Paris" in text(full)


def test_bad_requests_get_a_json_error_and_the_server_stays_up(client, server):
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        chat(client, [])
    with pytest.raises(
        openai.BadRequestError,
        match=rf"the prompt has \d+ tokens, more than this server's --max-context {MAX_CONTEXT}",
    ):
        chat(client, ask(DOCUMENT * 3))
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


def test_the_memory_check_runs_before_the_server_starts(embedded_folder):
    result = run_module("mlx_longheads.server", "--max-context", "1024m", "--port", "0")
    assert_one_line_error(result, "this run needs about", "lower --max-context")


def test_a_port_in_use_is_one_clear_line(embedded_folder, capfd):
    """What `serving` reads to try another port (the server's main called here)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_main(server_main, "--port", str(port), *SERVER_FLAGS, capfd=capfd)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "pass another --host or --port")


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

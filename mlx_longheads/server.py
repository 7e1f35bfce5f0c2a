"""`python -m mlx_longheads.server`: mlx_lm.server, the OpenAI-compatible HTTP server,
serving a LongHeads model.

  python -m mlx_longheads.server --model ... --max-context 128k --port 8080

mlx-lm's flags, endpoints, request handling, tokenization, sampling, stop words, tool
calls and prompt-cache store, with what LongHeads needs changed:
  - one model, loaded as `mlx_longheads.load` loads it (a .gguf file or the embedded
    default too) and checked against the machine's memory at --max-context before the
    server starts;
  - the prompt-cache store continues from where a trimmed LongHeads cache really ends
    (`LongHeadsCache.trim`), so each turn of a conversation prefills its new tokens only;
  - an unknown model, an empty prompt or one over --max-context gets a JSON 4xx before
    any work;
  - GET /v1/models lists the served model (mlx-lm's lists the Hugging Face cache, and
    fails on a machine without one).
tests/test_server.py pins the mlx-lm code these hook into.
"""

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Optional
from unittest import mock
from urllib.parse import unquote

import mlx.core as mx
from mlx_lm import server as mlx_lm_server
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import APIHandler, CompletionRequest, ModelProvider, ResponseGenerator
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .cache import LongHeadsCache
from .cli import add_longheads_arguments, exit_on_bad_input, longheads_arguments
from .config import DEFAULT_KV_GROUP_SIZE, LongHeadsConfig
from .generation import LimitError, check_memory
from .load import prepare
from .resolve import DEFAULT_GGUF, resolve_model

# The model mlx-lm's handler asks for when a request names none.
DEFAULT_MODEL = "default_model"


def build_parser() -> argparse.ArgumentParser:
    """mlx_lm.server's flags (its main builds the parser inline: taken from there) and
    LongHeads' (those of mlx_longheads.generate)."""

    class Built(Exception):
        pass

    class Capture(argparse.ArgumentParser):
        def parse_args(self, *args, **kwargs):
            raise Built(self)

    with mock.patch.object(mlx_lm_server, "argparse", SimpleNamespace(ArgumentParser=Capture)):
        try:
            mlx_lm_server.main()
        except Built as built:
            mlx_lm_parser = built.args[0]
    parser = argparse.ArgumentParser(
        description="mlx_lm.server's OpenAI-compatible HTTP API, with LongHeads attention.",
        parents=[mlx_lm_parser],
        add_help=False,  # the parent's --help
    )
    parser.set_defaults(kv_group_size=None)  # LongHeads' default depends on the head dim
    add_longheads_arguments(parser)
    return parser


class LongHeadsModelProvider(ModelProvider):
    """mlx-lm's model provider for one model, loaded as `mlx_longheads.load` loads it.

    mlx-lm loads whatever model a request names; here a request may only name the
    served one (the memory check and LongHeads' configuration are for it).
    """

    def __init__(self, cli_args: argparse.Namespace, longheads: Optional[LongHeadsConfig]):
        super().__init__(cli_args)
        self.longheads = longheads
        self.config: Optional[LongHeadsConfig] = None  # resolved when loaded
        self.model_id = cli_args.model or Path(DEFAULT_GGUF).stem
        path = str(resolve_model(cli_args.model))
        self.names = {DEFAULT_MODEL, self.model_id, path}
        for name in self.names:
            self._model_map[name] = path
            self._adapter_map[name] = cli_args.adapter_path

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        super()._load(model_path, adapter_path, draft_model_path)
        self.config = prepare(self.model, self.longheads)
        mx.eval(self.model.parameters())
        # LongHeads caches do not merge into mlx-lm's batches: one request at a time.
        self.is_batchable = self.is_batchable and self.config is None


class LongHeadsPromptCache(LRUPromptCache):
    """mlx-lm's prompt-cache store, for caches whose trim may cut further than asked.

    mlx-lm trims a longer cached conversation back to the prefix it shares with the
    request and takes the cut to be where it asked. A LongHeads cache cuts back to a
    chunk's start where it no longer holds that chunk's raw queries (`LongHeadsCache.trim`):
    the prompt then continues from where the cache ends, at most w - 1 tokens earlier.
    """

    def fetch_nearest_cache(self, model: Any, tokens: List[int]):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        if cache and isinstance(cache[0], LongHeadsCache):
            rest = tokens[cache[0].offset :]
        return cache, rest


class Refusal(Exception):
    """A request the server cannot serve: an HTTP status, a message naming the fix, and
    OpenAI's error code where it has one."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.code = status, code


class LongHeadsHandler(APIHandler):
    """mlx-lm's request handler, refusing with a JSON 4xx, before any work, what the
    server cannot serve."""

    def handle_completion(self, request: CompletionRequest, stop_words: List[str]):
        try:
            self.check(request)
        except Refusal as refusal:
            self.send_error_json(refusal.status, str(refusal), refusal.code)
            return
        super().handle_completion(request, stop_words)

    def check(self, request: CompletionRequest) -> None:
        """Raise a Refusal for a request that cannot be served; else cut max_tokens to
        the context left."""
        provider = self.response_generator.model_provider
        if self.requested_model not in provider.names:
            raise Refusal(
                404,
                f"model {self.requested_model!r} is not served here: "
                f"ask for {provider.model_id!r} (GET /v1/models)",
                "model_not_found",
            )
        if self.adapter is not None or self.requested_draft_model != DEFAULT_MODEL:
            raise Refusal(
                400,
                "this server serves one model: start it with --adapter-path or "
                "--draft-model instead of naming them in a request",
            )
        if not (request.messages if request.request_type == "chat" else request.prompt):
            raise Refusal(400, "the prompt is empty: send at least one message, or some text")
        # Tokenized here for the count (the generation thread does it again: a fraction
        # of a second at 128k); mlx-lm's _tokenize reads nothing else of the arguments.
        try:
            arguments = SimpleNamespace(chat_template_kwargs=self.chat_template_kwargs)
            prompt = self.response_generator._tokenize(provider.tokenizer, request, arguments)[0]
        except Exception as e:  # a template's own checks, a malformed message or prompt
            raise Refusal(
                400,
                f"the request cannot be tokenized ({type(e).__name__}: {e}): "
                "check its messages or prompt",
            )
        limit = self.response_generator.cli_args.max_context
        if len(prompt) > limit:
            raise Refusal(
                400,
                f"the prompt has {len(prompt)} tokens, more than this server's --max-context "
                f"{limit}: shorten it, or restart the server with a larger --max-context",
                "context_length_exceeded",
            )
        self.max_tokens = max(1, min(self.max_tokens, limit - len(prompt)))

    def send_error_json(self, status: int, message: str, code: Optional[str] = None) -> None:
        """An error in OpenAI's format, whose message the openai client shows (it does
        not show mlx-lm's {"error": message})."""
        logging.warning(f"refused ({status}): {message}")
        self._set_completion_headers(status)
        self.end_headers()
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        self.wfile.write(json.dumps({"error": error}).encode())

    def handle_models_request(self):
        """The served model (GET /v1/models, or /v1/models/<id>) in OpenAI's format."""
        provider = self.response_generator.model_provider
        model = {
            "id": provider.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx-longheads",
        }
        asked = unquote(self.path.split("?")[0][len("/v1/models") :].strip("/"))
        if asked and asked not in provider.names:
            self.send_error_json(
                404, f"model {asked!r} is not served here: it serves {provider.model_id!r}", "model_not_found"
            )
            return
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(model if asked else {"object": "list", "data": [model]}).encode())


def serve(args: argparse.Namespace) -> None:
    """Load and check everything that can fail (a one-line error), then serve until Ctrl-C."""
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s - %(levelname)s - %(message)s",
    )
    longheads = longheads_arguments(args)
    if longheads is None:
        args.kv_group_size = args.kv_group_size or DEFAULT_KV_GROUP_SIZE
    else:
        if args.draft_model is not None:
            raise LimitError(
                "--draft-model is not supported with LongHeads (the draft's tokens are checked "
                "in one call, where they would share one selection): use --attention full"
            )
        args.kv_bits = None  # in LongHeads' configuration: quantized from the first token
    provider = LongHeadsModelProvider(args, longheads)
    provider.load_default()
    check_memory(provider.model, args.max_context, provider.config)
    maybe_set_recommended_wired_limit()
    prompt_cache = LongHeadsPromptCache(args.prompt_cache_size, args.prompt_cache_bytes or 1 << 63)
    generator = ResponseGenerator(provider, prompt_cache)
    try:
        mlx_lm_server._run_http_server(
            args.host, args.port, generator, handler_class=LongHeadsHandler
        )
    except OSError as e:
        raise LimitError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): pass another --host or --port"
        ) from None
    finally:
        generator.stop_and_join()


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_bad_input(lambda: serve(args))


if __name__ == "__main__":
    main()

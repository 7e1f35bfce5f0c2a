"""`python -m mlx_longheads.eval`: LongHeads against stock and sliding-window attention
on the same long-context prompts (passkey, needle, multikey, multivalue, aggregation,
perplexity), resumable, with a markdown table and plots.

  python -m mlx_longheads.eval passkey --lengths 4k,8k,16k --samples 5 \\
      --methods longheads,full,window
  python -m mlx_longheads.eval needle --methods "longheads:L=2048,w=128,sel=kv_head"
  python -m mlx_longheads.eval report            # table and plots from the results only

Results: one JSON-lines file per (task, method) under --output, one line per finished
sample; a rerun skips the samples already there, so an interrupted run loses at most
the sample in progress.
"""

import argparse
import importlib.metadata
import json
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from . import longheads
from .cli import exit_on_bad_input
from .config import DEFAULT_KV_GROUP_SIZE, SELECTIONS, LongHeadsConfig
from .eval_report import TASK_ORDER, results_path, write_report
from .generation import format_context_length, parse_context_length, prefill_status, stream_generate
from .load import load
from .models import head_dim, longheads_config
from .tasks import make_sample, perplexity_text

PREFILL_STEP = 2048  # mlx-lm's prefill step; perplexity calls the model in these blocks
KEPT_TOKENS = 4  # attention sinks kept by the window's rotating cache, as mlx-lm keeps
DEFAULT_FORCED = "first+prev"
SCORES = ("raw", "rotated")
FORCED = (DEFAULT_FORCED, "first", "prev")
METHOD_HELP = (
    f"longheads[:L=..,w=..,sel={'|'.join(SELECTIONS)},prefill=grouped|exact,F=..,filter=..,"
    "score=raw|rotated,forced=first+prev|first|prev,kv=8|4,kvg=32|64|128], full, window[:L=..], "
    "or the presets baselines, ablation and designs"
)


def code_version(package: Path = Path(__file__).parent) -> str:
    """Which code made a record: `git describe --always --dirty` where the package sits
    in a git checkout, else the installed distribution's version."""
    checkout = package.parent
    if (checkout / ".git").exists():
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=checkout, capture_output=True, text=True
        )
        if described.returncode == 0:
            return described.stdout.strip()
    try:
        return f"mlx-longheads {importlib.metadata.version('mlx-longheads')}"
    except importlib.metadata.PackageNotFoundError:  # a copied tree on the path
        return "unknown"


@dataclass(frozen=True)
class Method:
    """One way to attend. score and forced are ablations of LongHeads' selection that
    the library has no option for; `selection_variant` applies them."""

    kind: str  # "longheads", "full" or "window"
    config: Optional[LongHeadsConfig] = None  # resolved; longheads only
    window: Optional[int] = None  # tokens the rotating cache keeps; window only
    score: str = "raw"  # the query the chunk score uses: raw (the paper) or R(q, w)
    forced: str = DEFAULT_FORCED  # chunks every head keeps besides its own

    @property
    def name(self) -> str:
        """Canonical: two spellings of one method share one results file."""
        if self.kind == "full":
            return "full"
        if self.kind == "window":
            return f"window:L={self.window}"
        c = self.config
        name = f"longheads:L={c.attention_length},w={c.chunk_size},sel={c.selection},prefill={c.prefill}"
        if c.full_attention_length != c.attention_length:  # F = L, the paper's, is unnamed
            name += f",F={c.full_attention_length}"
        if c.filter_layer is not None:  # the filter layer given, not calibrated
            name += f",filter={c.filter_layer}"
        if self.score != "raw":
            name += f",score={self.score}"
        if self.forced != DEFAULT_FORCED:
            name += f",forced={self.forced}"
        if c.kv_bits is not None:  # quantized K/V; a name without kv= is float
            name += f",kv={c.kv_bits}"
            if c.kv_group_size != DEFAULT_KV_GROUP_SIZE:
                name += f",kvg={c.kv_group_size}"
        return name


def whole_number(method: str, key: str, value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"method {method!r}: {key} must be a positive whole number, got {value!r}")
    return int(value)


def parse_method(
    text: str, flags: LongHeadsConfig, trained_length: int, head_dim: Optional[int] = None
) -> Method:
    """'longheads:L=2048,w=128' etc.; what a name leaves out comes from the flags.
    kv=8|4 stores keys and values quantized (kvg= their group size, default 64 or the
    head dim)."""
    kind, _, rest = text.strip().partition(":")
    allowed = {"full": (), "window": ("L",), "longheads": ("L", "w", "sel", "prefill", "F", "filter", "score", "forced", "kv", "kvg")}
    if kind not in allowed:
        raise ValueError(f"unknown method {text!r}: use {METHOD_HELP}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in allowed[kind]:
            raise ValueError(
                f"method {text!r}: {item!r} is not one of {', '.join(k + '=' for k in allowed[kind]) or 'nothing'}"
            )
        options[key.strip()] = value.strip()
    if kind == "full":
        return Method("full")
    default_length = flags.resolve(trained_length).attention_length
    if kind == "window":
        return Method("window", window=whole_number(text, "L", options.get("L", str(default_length))))
    config = flags
    if "L" in options:
        config = replace(config, attention_length=whole_number(text, "L", options["L"]))
    if "w" in options:
        config = replace(config, chunk_size=whole_number(text, "w", options["w"]))
    if "F" in options:
        config = replace(config, full_attention_length=whole_number(text, "F", options["F"]))
    if "filter" in options:
        if not options["filter"].isdigit():
            raise ValueError(f"method {text!r}: filter (a layer index) must be a whole number, got {options['filter']!r}")
        config = replace(config, filter_layer=int(options["filter"]))
    if "kv" in options:
        config = replace(config, kv_bits=whole_number(text, "kv", options["kv"]))
    if "kvg" in options:
        if config.kv_bits is None:
            raise ValueError(f"method {text!r}: kvg= (the K/V group size) needs kv=")
        config = replace(config, kv_group_size=whole_number(text, "kvg", options["kvg"]))
    config = replace(
        config, selection=options.get("sel", config.selection), prefill=options.get("prefill", config.prefill)
    ).resolve(trained_length, head_dim)
    score, forced = options.get("score", "raw"), options.get("forced", DEFAULT_FORCED)
    if score not in SCORES or forced not in FORCED:
        raise ValueError(f"method {text!r}: score is one of {SCORES}, forced one of {FORCED}")
    if config.links_layers and (score, forced) != ("raw", DEFAULT_FORCED):
        raise ValueError(
            f"method {text!r}: the score and forced ablations wrap the per-head selection, "
            f"which sel={config.selection} does not use alone"
        )
    return Method("longheads", config, score=score, forced=forced)


def presets(trained_length: int) -> Dict[str, List[str]]:
    """Named lists of methods. baselines: LongHeads' defaults against full attention and
    the sliding window, with its main variations; ablation: one of the defaults changed
    at a time, and the paper's rule with its chunk score or forced chunks changed;
    designs: the selection rules side by side: the paper's per-head rule at its
    threshold F = L and at F = the trained length, two_pass_carry, one_pass_filter,
    two_pass_prompt, one_pass_prompt and one_pass_reread.
    Lengths are fractions of the trained length, rounded to a multiple of every chunk
    size used."""
    fraction = lambda f: int(trained_length * f) // 256 * 256  # noqa: E731
    quarter, half, three_quarters = fraction(0.25), fraction(0.5), fraction(0.75)
    return {
        "baselines": [
            "full", "window", "longheads", "longheads:sel=kv_head", "longheads:prefill=exact",
            f"longheads:L={quarter}", f"longheads:L={half}", f"longheads:L={three_quarters}",
            "longheads:w=128",
        ],
        "ablation": [
            "longheads", f"longheads:L={quarter}", f"longheads:L={half}", f"longheads:L={three_quarters}",
            "longheads:w=64", "longheads:w=128", "longheads:w=256",
            "longheads:prefill=exact", "longheads:sel=kv_head", "longheads:sel=query_head,score=rotated",
            "longheads:sel=query_head,forced=first", "longheads:sel=query_head,forced=prev",
        ],
        "designs": [
            "full", f"longheads:sel=query_head,F={quarter}", "longheads:sel=query_head",
            "longheads:sel=two_pass_carry", "longheads:sel=one_pass_filter", "longheads:sel=two_pass_prompt",
            "longheads:sel=one_pass_prompt", "longheads:sel=one_pass_reread",
        ],
    }


def parse_methods(
    text: str, flags: LongHeadsConfig, trained_length: int, head_dim: Optional[int] = None
) -> List[Method]:
    names = []
    for part in split_methods(text):
        names += presets(trained_length).get(part, [part])
    methods = {}
    for name in names:
        method = parse_method(name, flags, trained_length, head_dim)
        methods.setdefault(method.name, method)
    return list(methods.values())


def split_methods(text: str) -> List[str]:
    """'longheads:L=2048,w=128,full,window' -> the three methods (a comma followed by
    key=value continues the method before it)."""
    parts: List[str] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" in item and ":" not in item and parts:
            parts[-1] += "," + item
        else:
            parts.append(item)
    return parts


def parse_lengths(text: str) -> List[int]:
    try:
        return sorted({parse_context_length(s) for s in text.split(",") if s.strip()})
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--lengths: {e}")


def parse_tasks(text: str) -> List[str]:
    tasks = TASK_ORDER if text == "all" else [t.strip() for t in text.split(",")]
    unknown = [t for t in tasks if t not in TASK_ORDER]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: use {', '.join(TASK_ORDER)}, all or report")
    return tasks


@contextmanager
def selection_variant(method: Method, model: nn.Module) -> Iterator[None]:
    """The scoring-space and forced-chunk ablations, through the library's public
    `longheads.select_chunks` (wrapped while the method runs, restored after).

    score=rotated scores with R(q, w), the query placed right after the chunk, instead
    of the raw query against the representation (which pools keys rotated by their
    offset inside the chunk). forced=first / prev keeps only the first / previous
    chunk besides the own one and retrieves one chunk more; the dropped chunk is not
    a candidate either (the library retrieves from chunks 1 .. own-2 only).
    """
    if method.score == "raw" and method.forced == DEFAULT_FORCED:
        yield
        return
    original = longheads.select_chunks
    rope, w = model.layers[0].self_attn.rope, method.config.chunk_size

    def select(query_sums, representations, own, k, n_kv_heads=None):
        if method.score == "rotated":
            query_sums = rope(query_sums[..., None, :], offset=w)[..., 0, :]
        if method.forced == DEFAULT_FORCED:
            return original(query_sums, representations, own, k, n_kv_heads)
        # [0, top_(k-2), own-1, own]; drop chunk 0 or own-1 to keep k slots in order.
        slots = original(query_sums, representations, own, k + 1, n_kv_heads)
        drop = 0 if method.forced == "prev" else k - 1
        return mx.concatenate([slots[..., :drop], slots[..., drop + 1 :]], axis=-1)

    with select_chunks_replaced(select):
        yield


@contextmanager
def selection_replaced(select: Callable[..., mx.array], name: str = "select_chunks") -> Iterator[None]:
    """`longheads.<name>` (a selection rule) is `select` while the block runs, the
    previous one after."""
    previous = getattr(longheads, name)
    setattr(longheads, name, select)
    try:
        yield
    finally:
        setattr(longheads, name, previous)


def select_chunks_replaced(select: Callable[..., mx.array]) -> Iterator[None]:
    """`longheads.select_chunks` is `select` while the block runs (the hook of the
    ablations and of the studies in scripts/)."""
    return selection_replaced(select)


class SelectionLog:
    """The chunks the heads select for the prompt's last token, one array per layer: is
    the planted sentence's chunk among them? Wraps the selection rules (inside the
    ablations' wrapper) while a sample runs; records while `active`."""

    RULES = ("select_chunks", "select_chunks_pooled")

    def __init__(self):
        self.active, self.selected = False, []

    def recording(self, inner: Callable[..., mx.array]) -> Callable[..., mx.array]:
        def select(*args, **kwargs):
            slots = inner(*args, **kwargs)
            if self.active:
                self.selected.append(slots)
            return slots

        return select

    @contextmanager
    def installed(self) -> Iterator[None]:
        with ExitStack() as stack:
            for name in self.RULES:
                stack.enter_context(selection_replaced(self.recording(getattr(longheads, name)), name))
            yield

    def watch(self, progress: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """mlx-lm reports total - 1 tokens before the last prompt token's step and total
        after it (and after building the first answer token's step)."""

        def show(done: int, total: int) -> None:
            self.active = done == total - 1
            progress(done, total)

        return show

    def share_selecting(self, chunk: int, n_layers: int, passes: int = 1) -> Optional[List[float]]:
        """Per layer, the share of selecting heads whose window holds `chunk` in the last
        of the step's `passes` through the layers (None when the prompt was too short for
        selection)."""
        selected = self.selected[(passes - 1) * n_layers : passes * n_layers]
        if len(selected) < n_layers:
            return None
        return [round((slots == chunk).any(axis=-1).mean().item(), 4) for slots in selected]


class Progress:
    """One status line on stderr: samples done of the run, the current sample's prefill."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream

    def write(self, text: str, end: str = "") -> None:
        self.stream.write(f"\r[{self.done}/{self.total}] {text}".ljust(100) + end)
        self.stream.flush()

    def prefill(self, label: str) -> Callable[[int, int], None]:
        start = time.perf_counter()

        def show(done: int, total: int) -> None:
            self.write(f"{label}: prefill {prefill_status(done, total, time.perf_counter() - start)}")

        return show

    def finished(self, label: str, summary: str) -> None:
        self.done += 1
        self.write(f"{label}: {summary}", end="\n")


def answer_question(
    model: nn.Module, tokenizer, prompt: List[int], max_tokens: int, cache, progress
) -> Tuple[str, float]:
    """The greedy answer and the prefill seconds (until the first token)."""
    text, prefill_s = "", 0.0
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens, prompt_cache=cache, prompt_progress_callback=progress
    ):
        text += response.text
        prefill_s = response.prompt_tokens / response.prompt_tps
    return text, prefill_s


def position_buckets(n: int) -> List[Tuple[int, int]]:
    """[0, 1k), [1k, 2k), [2k, 4k), ... doubling past n."""
    edges = [0, 1024]
    while edges[-1] < n:
        edges.append(edges[-1] * 2)
    return list(zip(edges, edges[1:]))


def call_nll(model: nn.Module, inputs: List[int], targets: List[int], cache) -> List[float]:
    """The model called once on `inputs` after what `cache` holds: -log p of each target."""
    logits = model(mx.array(inputs)[None], cache=cache)[0].astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(targets)[:, None], axis=-1)[:, 0]
    nll = mx.logsumexp(logits, axis=-1) - picked
    mx.eval(nll, [c.state for c in cache])
    return nll.tolist()


def token_nll(model: nn.Module, tokens: List[int], cache, progress) -> List[float]:
    """-log p(token i | tokens < i) for i = 1..n-1, the model called in PREFILL_STEP blocks."""
    inputs, targets = tokens[:-1], tokens[1:]
    nll: List[float] = []
    progress(0, len(inputs))
    for start in range(0, len(inputs), PREFILL_STEP):
        nll += call_nll(model, inputs[start : start + PREFILL_STEP], targets[start : start + PREFILL_STEP], cache)
        mx.clear_cache()
        progress(min(start + PREFILL_STEP, len(inputs)), len(inputs))
    return nll


def make_cache(model: nn.Module, method: Method) -> list:
    """window: mlx-lm's rotating cache built per layer, because make_prompt_cache (and
    generate_step's max_kv_size) ignore the size for models with their own make_cache,
    llama among them (mlx-lm 0.32.2)."""
    if method.kind == "window":
        return [RotatingKVCache(method.window, keep=KEPT_TOKENS) for _ in model.layers]
    return make_prompt_cache(model)


def perplexity_record(model, tokenizer, cache, n: int, index: int, seed: int, progress) -> dict:
    tic = time.perf_counter()
    tokens, repeats_at = perplexity_text(tokenizer, n, index, seed)
    nll = token_nll(model, tokens, cache, progress)
    buckets = []  # [first position, end, summed loss, count]; position p's loss is nll[p - 1]
    for lo, hi in position_buckets(len(tokens)):
        part = nll[max(lo, 1) - 1 : hi - 1]
        if part:
            buckets.append([lo, hi, sum(part), len(part)])
    seconds = round(time.perf_counter() - tic, 2)
    return dict(
        tokens=len(tokens), repeats_at=repeats_at, buckets=buckets, nll=sum(nll) / len(nll),
        prefill_s=seconds, total_s=seconds,
    )


def prefilled(
    model: nn.Module, tokens: List[int], progress: Callable[[int, int], None] = lambda done, total: None
) -> list:
    """A fresh cache holding `tokens`, fed in mlx-lm's prefill steps."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), PREFILL_STEP):
        model(mx.array([tokens[start : start + PREFILL_STEP]]), cache=cache)
        mx.eval([c.state for c in cache])
        progress(min(start + PREFILL_STEP, len(tokens)), len(tokens))
    return cache


class PrefixStore:
    """The caches of prompts' first tokens, shared by the LongHeads methods that
    compute them alike: below the full attention length F every query attends to all
    tokens before it, whatever L or the selection, so methods with the same F, chunk
    size, prefill and K/V storage hold the same cache there (mlx-lm prefills in
    PREFILL_STEP blocks; the shared part is whole blocks). Several designs are then
    evaluated with that part prefilled once per sample. Held in memory for the run."""

    def __init__(self):
        self.caches: Dict[tuple, list] = {}

    @staticmethod
    def key(method: Method, prompt: List[int]) -> Optional[tuple]:
        if method.kind != "longheads":
            return None
        c = method.config
        shared = c.full_attention_length // PREFILL_STEP * PREFILL_STEP
        if shared < PREFILL_STEP or len(prompt) <= shared:
            return None
        return (tuple(prompt[:shared]), c.chunk_size, c.full_attention_length, c.prefill, c.kv_bits, c.kv_group_size)

    def restore(
        self, model: nn.Module, method: Method, prompt: List[int], cache: list,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> int:
        """Fill `cache` (fresh) with the prompt's shared part; return its length (0: none)."""
        key = self.key(method, prompt)
        if key is None:
            return 0
        if key not in self.caches:
            self.caches[key] = prefilled(model, list(key[0]), lambda done, _: progress(done, len(prompt)))
        for layer, kept in zip(cache, self.caches[key]):
            layer.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, kept.state)
        return len(key[0])


def question_record(
    task: str, model, tokenizer, cache, n: int, index: int, seed: int, progress,
    chunk_size: Optional[int] = None, reuse: Callable[..., int] = lambda prompt, progress: 0,
) -> dict:
    """chunk_size (LongHeads): also record which layers' heads select the chunk of the
    first expected answer's first occurrence in the prompt. reuse(prompt, progress):
    fills the cache with the prompt's first tokens and says how many (a PrefixStore's;
    then prefill_s is the rest's)."""
    tic = time.perf_counter()
    sample = make_sample(task, tokenizer, n, index, seed)
    prompt = tokenizer.encode(sample.prompt)
    reused = reuse(prompt, progress)
    log = SelectionLog()
    with log.installed():
        answer, prefill_s = answer_question(
            model, tokenizer, prompt[reused:], sample.max_tokens, cache,
            log.watch(lambda done, total: progress(done + reused, total + reused)),
        )
    record = dict(
        tokens=len(prompt), expected=list(sample.expected), depths=[round(d, 4) for d in sample.depths],
        params=sample.params, answer=answer, score=sample.score(answer),
        prefill_s=round(prefill_s, 2), total_s=round(time.perf_counter() - tic, 2),
    )
    if reused:
        record["prefix_reused"] = reused
    if chunk_size is not None:
        key_chunk = sample.answer_chunk(tokenizer, chunk_size)
        config = longheads_config(model)
        passes = 1 if config is None else config.token_passes
        by_layer = log.share_selecting(key_chunk, len(model.layers), passes)
        if by_layer is not None:
            record.update(key_chunk=key_chunk, key_chunk_selected=round(sum(by_layer) / len(by_layer), 4),
                          key_chunk_selected_by_layer=by_layer)
    return record


def run_sample(
    task: str, model, tokenizer, method: Method, n: int, index: int, seed: int, progress,
    prefixes: Optional[PrefixStore] = None,
) -> dict:
    """Run one sample; the fields of its results line that depend on the method."""
    cache = make_cache(model, method)
    if task == "perplexity":
        return perplexity_record(model, tokenizer, cache, n, index, seed, progress)
    chunk_size = method.config.chunk_size if method.kind == "longheads" else None

    def reuse(prompt: List[int], progress: Callable[[int, int], None]) -> int:
        return prefixes.restore(model, method, prompt, cache, progress) if prefixes else 0

    record = question_record(task, model, tokenizer, cache, n, index, seed, progress, chunk_size, reuse)
    config = longheads_config(model)
    if config is not None and config.filter_layer is not None:  # calibrated where the name has none
        record["filter_layer"] = config.filter_layer
    return record


def read_done(path: Path, identity: dict) -> Tuple[Set[Tuple[int, int]], Set[Tuple[int, int]]]:
    """(length, index) of the finished and of the skipped samples in a results file.

    A line cut off by an interrupted write is dropped; results of another model or
    seed stop the run rather than mix.
    """
    if not path.exists():
        return set(), set()
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    done, skipped = set(), set()
    for line in text.splitlines():
        record = json.loads(line)
        for key, value in identity.items():
            if record.get(key) != value:
                raise ValueError(
                    f"{path} holds results with {key}={record.get(key)!r}, not {value!r}: "
                    "use another --output"
                )
        (skipped if "skipped" in record else done).add((record["length"], record["index"]))
    return done, skipped - done


@contextmanager
def method_model(method: Method, model_name: Optional[str], stock: nn.Module) -> Iterator[nn.Module]:
    """The model a method runs on: the stock one, or a LongHeads one loaded for it."""
    if method.kind != "longheads":
        yield stock
        return
    model, _ = load(model_name, longheads=method.config)
    with selection_variant(method, model):
        yield model


def evaluate(args) -> None:
    output = Path(args.output)
    if args.task == "report":
        print(write_report(output))
        return
    tasks = parse_tasks(args.task)
    lengths = parse_lengths(args.lengths)
    max_full = parse_lengths(args.max_length_full)[0]
    if args.samples < 1 or args.first_sample < 0:
        raise ValueError(f"--samples must be at least 1 and --first-sample at least 0, got {args.samples}, {args.first_sample}")
    stock, tokenizer = load(args.model, longheads=None)
    trained = stock.args.max_position_embeddings
    flags = LongHeadsConfig(
        args.chunk_size, args.attention_length, args.selection, args.prefill,
        full_attention_length=args.full_attention_length,
    )
    methods = parse_methods(args.methods, flags, trained, head_dim(stock.args))
    # Recorded, not part of a result's identity, so CPU (float32) and GPU (the model's
    # dtype) runs, and the code that made each record, can be told apart.
    runs_on = dict(
        device=str(mx.default_device()), dtype=str(stock.model.embed_tokens(mx.array([[0]])).dtype),
        commit=code_version(),
    )

    jobs = []
    for task in tasks:
        for method in methods:
            identity = dict(task=task, method=method.name, model=args.model or "default", seed=args.seed)
            path = results_path(output, task, method.name)
            done, skipped = read_done(path, identity)
            todo = [
                (n, i) for n in lengths
                for i in range(args.first_sample, args.first_sample + args.samples)
                if (n, i) not in done
                and not (method.kind == "full" and n > max_full and (n, i) in skipped)
            ]
            jobs.append((task, method, identity, path, todo))
    progress = Progress(sum(len(todo) for *_, todo in jobs))
    prefixes = PrefixStore()
    for task, method, identity, path, todo in jobs:
        if not todo:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with method_model(method, args.model, stock) as model, path.open("a") as results:
            for n, index in todo:
                label = f"{task} {method.name} {format_context_length(n)} #{index}"
                record = dict(identity, trained_length=trained, length=n, index=index, **runs_on)
                if method.kind == "full" and n > max_full:
                    record["skipped"] = f"full attention beyond --max-length-full {format_context_length(max_full)}"
                    progress.finished(label, "skipped")
                else:
                    record.update(run_sample(
                        task, model, tokenizer, method, n, index, args.seed, progress.prefill(label), prefixes
                    ))
                    summary = f"nll {record['nll']:.3f}" if task == "perplexity" else (
                        f"score {record['score']:.2f}, answer {record['answer']!r}"
                    )
                    progress.finished(label, f"{summary}, {record['total_s']:.0f}s")
                results.write(json.dumps(record) + "\n")
                results.flush()
    print(write_report(output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_longheads.eval",
        description="Long-context evaluation of LongHeads against stock and sliding-window attention."
    )
    parser.add_argument("task", help=f"{', '.join(TASK_ORDER)} (comma-separated), all, or report (table and plots from --output only)")
    parser.add_argument("--model", default=None, help="as for mlx_longheads.generate; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--lengths", default="4k,8k,16k,32k,64k,128k", help="prompt lengths in tokens, e.g. 4k,8k,16k")
    parser.add_argument("--samples", type=int, default=5, help="samples per length (needle: 3 give depths 0, 50, 100%%; 11 fill its depth grid)")
    parser.add_argument("--first-sample", type=int, default=0, help="index of the first sample: parallel runs can share one length's samples")
    parser.add_argument("--methods", default="longheads,full,window", help=METHOD_HELP)
    parser.add_argument("--output", default="results/eval", help="results folder (resumed if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed; every method gets the same samples")
    parser.add_argument("--max-length-full", default="32k", help="longest prompt run with full attention; longer ones are recorded as skipped")
    parser.add_argument("--chunk-size", type=int, default=None, help="LongHeads default for methods that do not set w=")
    parser.add_argument("--attention-length", type=int, default=None, help="LongHeads default for L= (and the window's length)")
    parser.add_argument("--selection", choices=list(SELECTIONS), default=LongHeadsConfig.selection)
    parser.add_argument("--prefill", choices=["grouped", "exact"], default="grouped")
    parser.add_argument("--full-attention-length", type=int, default=None, help="LongHeads default for F= (default: the trained length)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_bad_input(lambda: evaluate(args))


if __name__ == "__main__":
    main()

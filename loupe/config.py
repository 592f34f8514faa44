"""Server arguments: one dataclass, its command-line flags, and validation in one place."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from loupe.core import is_loopback

S = typing.TypeVar("S")
TRACE_LEVEL_ENV = ("LOUPE_TRACE_LEVEL", "SGLANG_TRACE_LEVEL")  # first set wins
SECRET_ENV = "LOUPE_DISAGGREGATION_SECRET"
TRACE_MODULES = ("request", "scheduler", "detokenizer", "disaggregation", "dp")  # --trace-modules


@dataclass(frozen=True)
class WorkerSettings:
    """What the engine beneath the scheduler needs: the model, where it runs, the KV cache size."""

    model_path: str | None
    dtype: str
    quantization: str
    compile_decode: bool  # unless --enforce-eager, where it applies (runner/compiled.py)
    device: str
    context_length: int | None
    max_total_tokens: int | None
    page_size: int
    max_running_requests: int
    ranks_per_node: int  # scheduler processes sharing this machine's memory and cores


@dataclass(frozen=True)
class SchedulerSettings:
    """What the batching policy needs."""

    max_running_requests: int
    chunked_prefill_size: int
    disable_radix_cache: bool
    random_seed: int


@dataclass(frozen=True)
class ExchangeSettings:
    """What one server of a prefill/decode pair needs to exchange KV with the other."""

    disaggregation_mode: str
    bootstrap_host: str
    disaggregation_bootstrap_port: int
    disaggregation_timeout: float
    disaggregation_transfer_backend: str
    disaggregation_secret: str | None


def _flag(default, help: str, *aliases: str):
    return field(default=default, metadata={"help": help, "aliases": aliases})


def flag_type(annotation) -> tuple[type, tuple | None]:
    """(the type a flag's text is parsed into, its choices) from a field's annotation:
    `int`, `float`, `str`, `X | None` (as X), `Literal[...]` (its values, of their type)."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if isinstance(annotation, types.UnionType):
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
    return annotation, None


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = _flag(None, "Hugging Face model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    served_model_name: str | None = _flag(None, "name clients send as `model` (default: derived from the path)")
    host: str = _flag("127.0.0.1", "address the HTTP server listens on")
    port: int = _flag(30000, "port the HTTP server listens on")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _flag("auto", "weights and activations dtype")
    quantization: Literal["auto", "none", "int4"] = _flag(
        "auto", "int4: the layers' weights held and multiplied as 4-bit groups of 32 (CPU); none: in --dtype, "
                "dequantised exactly from a quantised GGUF; auto: int4 for a GGUF stored in Q4_0/Q4_1, else none")
    enforce_eager: bool = _flag(False, "run every forward pass eagerly: do not compile the int4 decode step "
                                       "(torch.compile, before the server is ready: for the bundled model on 2 "
                                       "cores 15-20 s from the compiler's cache, 1-2 minutes the first time)")
    device: Literal["auto", "cpu", "cuda"] = _flag("auto", "where the model runs")
    tp_size: int = _flag(1, "tensor parallel degree: each layer split over this many scheduler processes")
    pp_size: int = _flag(1, "pipeline parallel degree: the layers split into this many stages")
    dp_size: int = _flag(1, "data parallel degree: independent replicas behind a DP controller")
    load_balance_method: Literal["round_robin", "least_loaded"] = _flag(
        "round_robin", "how the DP controller picks a replica")
    nnodes: int = _flag(1, "machines that together run each replica's TP x PP ranks")
    node_rank: int = _flag(0, "this machine's index among --nnodes (0 serves HTTP)")
    dist_init_addr: str | None = _flag(None, "host:port where the ranks meet (needed with --nnodes > 1; "
                                             "replica d uses port + d)")
    max_running_requests: int = _flag(64, "most requests decoding at once")
    max_total_tokens: int | None = _flag(None, "KV cache size in tokens (default: from free memory)")
    chunked_prefill_size: int = _flag(512, "most prompt tokens prefilled in one step")
    page_size: int = _flag(16, "tokens per KV cache page")
    context_length: int | None = _flag(None, "longest prompt plus output (default: the model's)")
    disable_radix_cache: bool = _flag(False, "do not reuse KV of shared prompt prefixes")
    random_seed: int = _flag(0, "seed for requests that do not give one")
    api_key: str | None = _flag(None, "require `Authorization: Bearer <key>` on every route but /health")
    max_queued_requests: int = _flag(256, "requests that may wait beyond --max-running-requests (x --dp-size): "
                                          "past that, new ones get 503 with Retry-After at once")
    cors_allow_origins: str | None = _flag(None, "comma-separated origins a browser may call the API from "
                                                 "(\"*\": any); without it, no CORS headers are sent")
    max_request_body_mb: float = _flag(8.0, "largest request body accepted, in MB: a larger one gets a 413 "
                                            "before anything reads it")
    enable_tracing: bool = _flag(False, "trace every request with OpenTelemetry", "--enable-trace")
    otlp_endpoint: str = _flag("http://localhost:4317", "where spans are exported: an OTLP endpoint, or "
                                 "file:///path/traces.jsonl for OTLP JSON lines (read by `loupe traces`)",
                                 "--otlp-traces-endpoint")
    trace_level: Literal[0, 1, 2, 3] = _flag(3, "0: off (until raised with POST /set_trace_level); 1: root span "
                                                "only; 2: plus stages; 3: plus chunks and decode steps (also "
                                                "from LOUPE_TRACE_LEVEL or SGLANG_TRACE_LEVEL)")
    trace_sampling_ratio: float | None = _flag(None, "share of requests traced, decided from the trace id "
                                                     "(default: from OTEL_TRACES_SAMPLER[_ARG], else 1.0)")
    trace_keep_errors: bool = _flag(False, "also export whole every request that failed, sampled or not "
                                           "(unsampled ones are recorded and held until they end)")
    trace_keep_slower_than_ms: float | None = _flag(None, "also export whole every request slower than this, "
                                                          "end to end, sampled or not")
    trace_keep_cancelled: bool = _flag(False, "also export whole every request cancelled (its client went away, or "
                                              "it was aborted), sampled or not; --trace-keep-errors keeps failures")
    trace_include_content: bool = _flag(False, "record prompt and completion text in traces")
    trace_modules: str = _flag(",".join(TRACE_MODULES), "which parts record spans beside each request's root, "
                               "comma-separated: request (the HTTP process's tokenize and dispatch), scheduler "
                               "(stages, chunks, decode steps), detokenizer, disaggregation (a pair's bootstrap "
                               "and KV transfer), dp (the data-parallel controller's dispatch)", "--trace-module")
    disaggregation_mode: Literal["null", "prefill", "decode"] = _flag(
        "null", "prefill or decode: this server is one half of a pair behind SGLang's router in PD mode, "
        "running prompts or generating from KV the other half computed (null: whole requests)")
    disaggregation_bootstrap_port: int = _flag(8998, "where a prefill server answers decode servers asking "
                                                     "for a request's KV")
    disaggregation_bootstrap_host: str | None = _flag(None, "prefill server: the address its bootstrap port "
                                                            "listens on, an internal interface say (default: --host)")
    disaggregation_secret: str | None = _flag(
        None, "shared by a pair's servers: authenticates and encrypts their bootstrap channel (also from "
              f"{SECRET_ENV}, which keeps it out of the process list). Needed when the bootstrap port or a "
              "prefill server is not on loopback; at least 16 characters")
    disaggregation_prefill_hosts: str | None = _flag(
        None, "decode server: the only prefill servers it may fetch KV from, comma-separated host or host:port "
              "(default: any, given a secret; loopback only without one)")
    disaggregation_transfer_backend: Literal["nixl", "tcp"] = _flag(
        "nixl", "how KV moves from prefill to decode server: nixl (UCX; pip install --no-deps nixl==1.5.1 "
        "nixl-cu12==1.5.1) writes it page by page into the decode server's memory, tcp sends it as ZMQ frames")
    disaggregation_timeout: float = _flag(60.0, "seconds a prefill server holds a request's KV for its decode "
                                                "server, and a decode server waits for it, before failing it")
    shutdown_timeout: float = _flag(30.0, "on SIGTERM, seconds running requests may take to finish while new "
                                          "ones get 503; then they are answered with an error and the server exits")
    log_level: Literal["debug", "info", "warning", "error"] = _flag("info", "log verbosity")
    log_requests: bool = _flag(False, "log one line per finished request: its trace id, status, token counts "
                                      "and stage latencies")

    def __post_init__(self) -> None:
        """Raise ValueError with one line naming the flag of the first bad value."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be {rule}, got {getattr(self, name)!r}")

        for name, annotation in typing.get_type_hints(type(self)).items():
            choices = flag_type(annotation)[1]
            if choices and getattr(self, name) not in choices:
                need(False, name, "one of " + ", ".join(map(str, choices)))
        need(0 < self.port < 65536, "port", "in 1..65535")
        for name in ("tp_size", "pp_size", "dp_size", "nnodes", "max_running_requests", "chunked_prefill_size",
                     "page_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(0 <= self.node_rank < self.nnodes, "node_rank", f"in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        need(self.tp_size * self.pp_size % self.nnodes == 0, "nnodes",
             f"a divisor of --tp-size x --pp-size ({self.tp_size * self.pp_size})")
        need(self.nnodes == 1 or self.dist_init_addr is not None, "dist_init_addr", "host:port when --nnodes > 1")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            need(bool(host) and port.isdigit() and 0 < int(port) < 65536, "dist_init_addr", "host:port")
        need(self.max_total_tokens is None or self.max_total_tokens >= 2 * self.page_size,
             "max_total_tokens", f"at least two pages ({2 * self.page_size} tokens)")
        need(self.context_length is None or self.context_length >= 2, "context_length", "an integer >= 2")
        need(self.api_key is None or self.api_key != "", "api_key", "non-empty")
        need(isinstance(self.max_queued_requests, int) and self.max_queued_requests >= 0, "max_queued_requests",
             "an integer >= 0")
        need(self.cors_allow_origins is None or bool(self.allowed_origins), "cors_allow_origins",
             "one or more origins, comma-separated")
        need(self.max_request_body_mb > 0, "max_request_body_mb", "a number of MB > 0")
        need(self.shutdown_timeout >= 0, "shutdown_timeout", "a number of seconds >= 0")
        need(0 < self.disaggregation_bootstrap_port < 65536, "disaggregation_bootstrap_port", "in 1..65535")
        need(self.disaggregation_timeout > 0, "disaggregation_timeout", "a number of seconds > 0")
        need(self.trace_sampling_ratio is None or 0 <= self.trace_sampling_ratio <= 1, "trace_sampling_ratio",
             "a number in [0, 1]")
        need(self.trace_keep_slower_than_ms is None or self.trace_keep_slower_than_ms >= 0,
             "trace_keep_slower_than_ms", "a number of milliseconds >= 0")
        need(set(self.traced_modules) <= set(TRACE_MODULES), "trace_modules",
             "a comma-separated list of " + ", ".join(TRACE_MODULES))
        need(self.disaggregation_secret is None or len(self.disaggregation_secret) >= 16, "disaggregation_secret",
             "at least 16 characters")
        need(self.disaggregation_mode != "prefill" or self.disaggregation_secret is not None or
             is_loopback(self.bootstrap_host), "disaggregation_secret",
             f"given (or {SECRET_ENV} set) when the bootstrap port listens beyond loopback "
             f"(on {self.bootstrap_host}): anyone who can reach it could otherwise ask for KV")
        need(self.disaggregation_prefill_hosts is None or all(self.allowed_prefill_hosts), "disaggregation_prefill_hosts",
             "comma-separated host or host:port entries")
        need(self.disaggregation_mode == "null" or self.tp_size * self.pp_size * self.dp_size * self.nnodes == 1,
             "disaggregation_mode", "null with --tp-size, --pp-size, --dp-size or --nnodes above 1 "
             "(a disaggregated server runs one rank)")

    @property
    def compile_decode(self) -> bool:
        """A prefill server never decodes: nothing to compile there."""
        return not self.enforce_eager and self.disaggregation_mode != "prefill"

    @property
    def bootstrap_host(self) -> str:
        return self.disaggregation_bootstrap_host or self.host

    @property
    def allowed_prefill_hosts(self) -> list[str]:
        return [h.strip().lower() for h in (self.disaggregation_prefill_hosts or "").split(",")]

    @property
    def allowed_origins(self) -> list[str]:
        return [o.strip() for o in (self.cors_allow_origins or "").split(",") if o.strip()]

    @property
    def traced_modules(self) -> list[str]:
        return [m.strip() for m in self.trace_modules.split(",") if m.strip()]

    def traces(self, module: str) -> bool:
        """Whether tracing is on and `module` (one of TRACE_MODULES) records its spans."""
        return self.enable_tracing and module in self.traced_modules

    @property
    def max_in_flight(self) -> int:
        """Generation requests the HTTP server holds at once: those that can run, plus the queue."""
        return self.max_running_requests * self.dp_size + self.max_queued_requests

    @property
    def ranks_per_node(self) -> int:
        """Scheduler processes on one machine: every replica's TP x PP ranks, split over nodes."""
        return self.dp_size * self.tp_size * self.pp_size // self.nnodes

    def settings(self, kind: type[S]) -> S:
        """The few settings one component uses: the fields (or properties) of ours it names."""
        return kind(**{f.name: getattr(self, f.name) for f in dataclasses.fields(kind)})

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names = ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]]
            kind = flag_type(hints[f.name])[0]
            if kind is bool:
                parser.add_argument(*names, dest=f.name, action="store_true", help=f.metadata["help"])
                continue
            parser.add_argument(*names, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default: {f.default})")

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> ServerArgs:
        parser = OneLineErrorParser(prog="loupe serve", description="Serve a model over an OpenAI-compatible API.")
        cls.add_cli_args(parser)
        for name in TRACE_LEVEL_ENV:  # the flag's default; the flag itself wins
            raw = os.environ.get(name, "").strip()
            if raw:
                if raw not in ("0", "1", "2", "3"):
                    parser.error(f"{name} must be 0, 1, 2 or 3, got {raw!r}")
                parser.set_defaults(trace_level=int(raw))
                break
        if os.environ.get(SECRET_ENV):
            parser.set_defaults(disaggregation_secret=os.environ[SECRET_ENV])
        ns = parser.parse_args(argv)
        try:
            return cls(**vars(ns))
        except ValueError as e:
            parser.error(str(e))


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag gets one line naming it (the usage is one `--help` away), and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

"""What both APIs do to turn a request body into the request the scheduler takes: open its
trace, tokenize, check a disaggregated request's bootstrap fields, validate once."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from loupe.core import InvalidRequest, TokenizedRequest
from loupe.server.protocol import APIError, RequestExtras
from loupe.server.tokenizer_manager import TokenizerManager
from loupe.tracing.spans import RequestTrace, now


class Intake:
    def __init__(self, manager: TokenizerManager, model_name: str, role: str = "null",
                 prefill_hosts: list[str] | None = None, has_secret: bool = False):
        self.manager, self.model_name = manager, model_name
        self.role = role  # --disaggregation-mode
        self.prefill_hosts, self.has_secret = prefill_hosts, has_secret  # where a decode server may connect

    def start_trace(self, request: Request, rid: str, operation: str, body: RequestExtras, prompt,
                    requested_model: str | None = None) -> RequestTrace | None:
        """Open the request's trace (None when tracing is off), under the caller's `traceparent`
        if valid; kept on `request.state` so an error response can end it. Whether it records
        anything is decided now, the request's own choice (`metadata.trace`) included."""
        wanted, tracer = body.trace_wanted(), self.manager.tracer  # a bad metadata.trace is a 400 all the same
        if tracer is None:
            return None
        attributes = {"gen_ai.operation.name": operation, "gen_ai.response.model": self.model_name,
                      "http.route": request.url.path, "gen_ai.request.stream": bool(getattr(body, "stream", False))}
        if requested_model is not None:
            attributes["gen_ai.request.model"] = requested_model
        if self.role != "null":
            attributes["disaggregation.role"] = self.role
            if body.bootstrap_room is not None:
                attributes["bootstrap_room"] = body.bootstrap_room
        headers = request.headers
        request.state.trace = tracer.start(rid, headers.get("traceparent"), headers.get("tracestate"), attributes,
                                           prompt, wanted)
        return request.state.trace

    @staticmethod
    def tokenize(trace: RequestTrace | None, tokenize: Callable[..., list[int]], text) -> list[int]:
        started = now()
        try:
            input_ids = tokenize(text)
        except InvalidRequest as e:  # too long to fit, told by its size before tokenizing
            raise APIError(400, str(e), param=e.param) from None
        if trace and trace.recording:
            trace.mark("tokenize", started, {"num_tokens": len(input_ids)})
        return input_ids

    def validated(self, rid: str, input_ids: list[int], params: dict, body: RequestExtras,
                  trace: RequestTrace | None, names: dict[str, str] | None = None) -> TokenizedRequest:
        """The request checked once; a 400 naming the field at fault (spelled as `names` maps
        the engine's names to the API's) if it cannot run."""
        bootstrap = None
        if self.role != "null":
            bootstrap = body.bootstrap()
            if bootstrap is None:
                raise APIError(400, f"this is the {self.role} server of a disaggregated pair: requests come "
                               "through SGLang's router in PD mode, which adds bootstrap_host, bootstrap_port "
                               "and bootstrap_room", param="bootstrap_room")
        try:
            if bootstrap is not None:
                bootstrap.check(self.prefill_hosts, self.has_secret, connects=self.role == "decode")
            return TokenizedRequest.validated(rid, input_ids, params, self.manager.limits,
                                              trace.carrier if trace else None, bootstrap)
        except InvalidRequest as e:
            message, param = e.named(names or {})
            raise APIError(400, message, param=param) from None

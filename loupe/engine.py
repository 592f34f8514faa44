"""The in-process engine: load a model and generate, without a server."""

from __future__ import annotations

import itertools

from loupe.config import ExchangeSettings, SchedulerSettings, ServerArgs, WorkerSettings
from loupe.core import TokenizedRequest
from loupe.distributed.parallel import Comm
from loupe.runner.worker import Worker
from loupe.scheduler.exchange import exchange_for
from loupe.scheduler.request import Req
from loupe.scheduler.scheduler import Scheduler
from loupe.server.native import generate_response, logprob_switches
from loupe.stops import final_text
from loupe.tracing.spans import SchedulerTracer


class Engine:
    """`Engine(model_path=..., dtype=..., **server_args)`; see `ServerArgs` for the options.
    With a `comm`, this is one rank of a tensor/pipeline-parallel group: every rank must
    call `generate` with the same arguments. With --disaggregation-mode it is one side of a
    prefill/decode pair (its requests then go in through `scheduler.add_request`)."""

    def __init__(self, model_path: str | None = None, comm: Comm | None = None,
                 tracer: SchedulerTracer | None = None, **kwargs):
        self.args = ServerArgs(model_path=model_path, **kwargs)
        self.worker = Worker(self.args.settings(WorkerSettings), comm)
        exchange = exchange_for(self.args.settings(ExchangeSettings), self.worker)
        self.scheduler = Scheduler(self.worker, self.args.settings(SchedulerSettings), exchange, tracer)
        self.tokenizer = self.worker.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a list of them (returns a list). With
        `return_logprob`, `meta_info` holds `output_token_logprobs` (and with `top_logprobs_num`,
        `output_top_logprobs`) as /generate gives them, token texts left None."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        single = isinstance(prompt, str) or (input_ids is not None and (not input_ids or isinstance(input_ids[0], int)))
        if prompt is not None:
            prompts = [prompt] if single else list(prompt)
            id_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            id_lists = [input_ids] if single else list(input_ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        if len(params) != len(id_lists):
            raise ValueError(f"got {len(params)} sampling_params for {len(id_lists)} prompts")
        if return_logprob or top_logprobs_num:
            params = [{**(p or {}), **logprob_switches(return_logprob, top_logprobs_num)} for p in params]
        # Validate every request before queueing any, so a bad one changes nothing.
        requests = [TokenizedRequest.validated(f"engine-{next(self._ids)}", ids, p, self.worker.limits)
                    for ids, p in zip(id_lists, params, strict=True)]
        reqs = [self.scheduler.add_request(request) for request in requests]
        while not all(r.finished for r in reqs):
            self.scheduler.step()
        outputs = [self._output(r) for r in reqs]
        return outputs[0] if single else outputs

    def _output(self, req: Req) -> dict:
        """The answer /generate gives (`server/native.py`), token texts left None."""
        text = final_text(self.tokenizer, req.output_ids, req.finish_reason, req.matched_stop)
        answer = generate_response(
            req.rid, text, list(req.output_ids), prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids), cached_tokens=req.cached_tokens or 0,
            finish_reason=req.finish_reason.value, matched_stop=req.matched_stop,
            logprobs=req.output_logprobs if req.sampling.logprobs else None, top=req.sampling.top_logprobs > 0)
        return answer.model_dump(mode="json", exclude_unset=True)

    def shutdown(self) -> None:
        self.scheduler = self.worker = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

"""Continuous batching for a server: conversations that arrive together are decoded together, one token a step.

One background thread owns the model. Requests wait in a bounded queue; between decoding steps the waiting ones
are prefilled one at a time (so a lone request computes exactly what `model.chat` computes) and join the running
batch. The batch's KV caches are left-padded to a common length: the attention mask hides the padding and
positions count real tokens only, so every row decodes as if it were alone. Rows leave the batch as soon as
they finish or their client goes away.

The engine knows token ids only; text (stop strings, tool calls) is the caller's business.
"""
import collections
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from chatglm3.model.generation import SAMPLE_TEMPERATURE, SAMPLE_TOP_P, next_token

# Why a reply ended: a stop token, the token budget, the caller cancelled it, or the engine failed.
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class EngineBusy(Exception):
    """The waiting queue is full (or the engine is shutting down): try again later."""


@dataclass
class SamplingParams:
    """One request's budget and sampling (the server fills it from the request's OpenAI fields)."""
    max_new_tokens: int
    temperature: float = SAMPLE_TEMPERATURE  # 0 = greedy
    top_p: float = SAMPLE_TOP_P
    seed: Optional[int] = None  # sampling with a seed repeats, whatever else shares the batch


@dataclass(eq=False)
class Job:
    """One reply being generated. `on_event(tokens, finish_reason)` is called from the engine thread: new token
    ids (stop tokens excluded) and, once, a finish reason (STOP, LENGTH, CANCELLED or ERROR)."""
    prompt_ids: list
    params: SamplingParams
    on_event: Callable[[list, Optional[str]], None]
    generated: int = 0  # tokens the model produced, stop token included
    error: Optional[str] = None
    cancelled: bool = field(default=False, repr=False)

    def cancel(self):
        """Stop generating (the client went away or has what it needs); takes effect before the next step."""
        self.cancelled = True


class Engine:
    """`submit` jobs from any thread; the engine thread decodes up to `max_batch` at once and keeps at most
    `max_queue` waiting."""

    def __init__(self, model, stop_ids, max_batch: int = 8, max_queue: int = 16):
        self.model = model.eval()
        self.device = model.device
        self.prefix_len = model.config.pre_seq_len or 0
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), device=self.device)
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.finished = collections.Counter()  # replies ended, by reason: every submitted job ends exactly once
        self._reset_batch()
        self._thread = threading.Thread(target=self._run, name="chatglm3-engine", daemon=True)
        self._thread.start()

    def _reset_batch(self):
        self._jobs: list[Job] = []  # the running rows, in batch order
        self._cache = None  # per layer (key, value): [rows, kv_groups, prefix + length, head_dim]
        self._mask = None  # [rows, length]: 1 real token, 0 left padding (the prefix is not in it)
        self._last = None  # [rows]: each row's latest token, the next step's input

    # --- the caller's side --------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list, params: SamplingParams, on_event) -> Job:
        job = Job(list(prompt_ids), params, on_event)
        with self._cond:
            if self._closed:
                raise EngineBusy("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._jobs)} replies running and {len(self._waiting)} waiting")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def load(self) -> dict:
        """Replies running and waiting now, and how many ended for each reason so far."""
        with self._cond:
            return {"running": len(self._jobs), "waiting": len(self._waiting), "finished": dict(self.finished)}

    def close(self):
        """Fail whatever is running or waiting and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # --- the engine thread ----------------------------------------------------------------------------------------
    def _run(self):
        while True:
            with self._cond:
                while not (self._waiting or self._jobs or self._closed):
                    self._cond.wait()
                if self._closed:
                    leftover = self._jobs + list(self._waiting)
                    self._waiting.clear()
                    break
                new = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - len(self._jobs)))]
            for job in new:
                self._guarded(self._admit, job)
            if self._jobs:
                self._guarded(self._step)
        for job in leftover:
            self._fail(job, "the server is shutting down")

    def _guarded(self, action, *args):
        """A failing step fails the rows it touched, never the engine: the server keeps serving."""
        try:
            with torch.no_grad():
                action(*args)
        except Exception as e:  # noqa: BLE001 - reported to every affected client
            message = f"{type(e).__name__}: {e}"
            newcomer = args[0] if args else None
            if newcomer is not None and newcomer not in self._jobs:  # failed before joining: the batch is intact
                self._fail(newcomer, message)
                return
            failed = self._jobs
            self._reset_batch()
            for job in failed:
                self._fail(job, message)

    def _fail(self, job: Job, message: str):
        job.error = message
        self._notify(job, [], ERROR)

    def _notify(self, job: Job, tokens: list, finish: Optional[str]):
        if finish is not None:
            self.finished[finish] += 1
        try:
            job.on_event(tokens, finish)
        except Exception:  # noqa: BLE001 - a consumer that cannot take events has gone away
            job.cancel()

    def _admit(self, job: Job):
        """Prefill the prompt alone, sample the first token and join the running batch."""
        if job.cancelled:
            self._notify(job, [], CANCELLED)
            return
        ids = torch.tensor([job.prompt_ids], device=self.device)
        out = self.model(ids, use_cache=True, return_last_logit=True)
        token = self._sample(out.logits[:, -1].float(), [job])
        self._join(out.past_key_values, torch.ones_like(ids), token, job)
        self._deliver(only_last=True)

    def _step(self):
        """One token for every running row."""
        cancelled = [i for i, job in enumerate(self._jobs) if job.cancelled]
        for i in cancelled:
            self._notify(self._jobs[i], [], CANCELLED)
        self._remove(cancelled)
        if not self._jobs:
            return
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._jobs), 1)], dim=1)
        out = self.model(self._last[:, None], attention_mask=mask, past_key_values=self._cache, use_cache=True,
                         return_last_logit=True)
        self._cache, self._mask = out.past_key_values, mask
        self._last = self._sample(out.logits[:, -1].float(), self._jobs)
        self._deliver()

    def _sample(self, logits: torch.Tensor, jobs: list) -> torch.Tensor:
        """Greedy for every row at once, then each sampling row with its own temperature, top_p and seed."""
        tokens = next_token(logits)
        for i, job in enumerate(jobs):
            p = job.params
            if p.temperature > 0:
                with self._seeded(p.seed, job.generated):
                    tokens[i] = next_token(logits[i:i + 1], do_sample=True, temperature=p.temperature, top_p=p.top_p)[0]
        return tokens

    @contextlib.contextmanager
    def _seeded(self, seed: Optional[int], step: int):
        """The global RNG seeded from (seed, step) for one draw, restored afterwards; untouched without a seed."""
        if seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hash((seed, step)) & 0x7FFF_FFFF_FFFF_FFFF)
            yield

    def _deliver(self, only_last: bool = False):
        """Hand each row its new token; rows that stopped or spent their budget leave the batch."""
        rows = [len(self._jobs) - 1] if only_last else range(len(self._jobs))
        stopped = torch.isin(self._last, self.stop_ids).tolist()
        tokens = self._last.tolist()
        finished = []
        for i in rows:
            job = self._jobs[i]
            job.generated += 1
            if stopped[i]:
                self._notify(job, [], STOP)
            else:
                self._notify(job, [tokens[i]], LENGTH if job.generated >= job.params.max_new_tokens else None)
            if stopped[i] or job.generated >= job.params.max_new_tokens:
                finished.append(i)
        self._remove(finished)

    def _join(self, cache, mask: torch.Tensor, token: torch.Tensor, job: Job):
        if self._cache is None:
            self._cache, self._mask, self._last, self._jobs = cache, mask, token, [job]
            return
        length = max(self._mask.shape[1], mask.shape[1])
        old_cache, old_mask = self._left_pad(self._cache, self._mask, length)
        new_cache, new_mask = self._left_pad(cache, mask, length)
        self._cache = tuple((torch.cat([ok, nk]), torch.cat([ov, nv])) for (ok, ov), (nk, nv) in zip(old_cache, new_cache))
        self._mask = torch.cat([old_mask, new_mask])
        self._last = torch.cat([self._last, token])
        self._jobs.append(job)

    def _left_pad(self, cache, mask: torch.Tensor, length: int):
        """Padding goes between the P-Tuning prefix (if any) and the tokens."""
        extra = length - mask.shape[1]
        if extra == 0:
            return cache, mask
        p = self.prefix_len

        def pad(t):
            return torch.cat([t[:, :, :p], t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3]), t[:, :, p:]], dim=2)

        return tuple((pad(k), pad(v)) for k, v in cache), torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)

    def _remove(self, rows: list):
        """Take rows out of the batch and trim the padding columns no remaining row needs."""
        if not rows:
            return
        keep = [i for i in range(len(self._jobs)) if i not in set(rows)]
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.device)
        self._jobs = [self._jobs[i] for i in keep]
        self._mask, self._last = self._mask[index], self._last[index]
        start = int((self._mask.sum(dim=0) > 0).nonzero()[0])  # first column some row still uses
        p = self.prefix_len

        def trim(t):
            t = t[index]
            return torch.cat([t[:, :, :p], t[:, :, p + start:]], dim=2) if start else t

        self._cache = tuple((trim(k), trim(v)) for k, v in self._cache)
        self._mask = self._mask[:, start:]

"""lm-eval's TemplateLM over our GPT, at any tensor- and data-parallel layout.

Every rank runs lm-eval on every request; the scoring is split. An item whose input is a prefix of another's
shares that one's row (multiple-choice continuations of one context mostly do). Rows are sorted longest first,
dealt round-robin to the data-parallel ranks, batched up to `batch_tokens` tokens (the longest row times the
rows), and only the scored positions go through the output layer. The scores are gathered, so each rank
returns all of them. Tensor-parallel ranks of a replica score the
same requests together; their vocab-sharded logits are gathered per batch. Pipeline stages pass each batch
forward (padded to a fixed shape: stages size their buffers once), the last stage scores it and sends the
scores to the other stages. A row longer than the model's context keeps its last seq_length + 1 tokens, as
lm-eval's own backends do. Rows are padded on the right: a causal model's scores of the real tokens do not see
the padding.

generate_until is greedy and recomputes the whole context for each new token (no KV cache): a slower path,
correct for the short generations of zero-shot tasks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch.distributed.tensor import DTensor

from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.model.gpt import GPT
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.parallel.pipeline import Pipeline
from bigscience_train.parallel.precision import autocast

# (tokens, number of trailing tokens to score): context and continuation together, already truncated.
Item = tuple[list[int], int]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def shared_rows(inputs: list[list[int]]) -> list[int]:
    """For each input, the input whose forward pass scores it: the longest one it is a prefix of (itself
    when none is). In lexicographic order, an input that is a prefix of any other is one of the next one."""
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    owner = list(range(len(inputs)))
    for shorter, longer in zip(reversed(order[:-1]), reversed(order[1:]), strict=True):
        if inputs[longer][: len(inputs[shorter])] == inputs[shorter]:
            owner[shorter] = owner[longer]
    return owner


class BigScienceLM(TemplateLM):
    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        penv: ParallelEnv,
        dtype: str = "fp32",
        batch_tokens: int = 8192,
        max_gen_tokens: int = 64,
        shard_requests: bool = True,
        batch_size: int | None = None,
        pipeline: Pipeline | None = None,
    ):
        """shard_requests=False: every rank scores every request, as FSDP needs (its forward gathers
        parameters over the data-parallel ranks, which must then run the same batches)."""
        super().__init__()
        self.model, self.tok, self.penv = model.eval(), tokenizer, penv
        self.dtype, self.batch_tokens, self.max_gen_tokens = dtype, batch_tokens, max_gen_tokens
        self.seq_length = model.shape.seq_length
        self.batch_size, self.pipeline = batch_size, pipeline
        if pipeline is not None:
            # One shape for every batch through the stages: rows x the whole context.
            self.batch_size = batch_size or max(1, batch_tokens // self.seq_length)
        self.shards, self.shard = (penv.dp, penv.dp_rank) if shard_requests else (1, 0)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode_batch([string])[0]

    # -- scoring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, rows: list[list[int]], at: list[tuple[int, int]]) -> torch.Tensor | None:
        """Next-token logits (len(at), vocab), on the device, at the (row, position) pairs `at`. Rows are
        padded on the right to the longest (to batch_size x seq_length through a pipeline, where ranks
        without the last stage get None)."""
        shape = (len(rows), max(len(r) for r in rows))
        if self.pipeline is not None:
            shape = (self.batch_size, self.seq_length)
        tokens = torch.full(shape, self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        tokens = tokens.to(self.penv.device)
        flat = torch.tensor([r * shape[1] + p for r, p in at], device=self.penv.device)
        with autocast(self.dtype, self.penv.device):
            if self.pipeline is None and self.model.sequence_shards == 1:
                return full(self.model(tokens, logits_at=flat))
            logits = self.model(tokens) if self.pipeline is None else self.pipeline.forward_only(tokens)
        return None if logits is None else full(logits).flatten(0, 1)[flat]

    def _score_batch(self, rows: list[list[int]], scored: list[list[Item]]) -> list[tuple[float, bool]]:
        """Scores of the items each row scores (scored[r]: row r's items), in that order."""
        at: dict[tuple[int, int], int] = {}
        wanted = []  # per item: its positions' indices in `at`, and its target tokens
        for r, items in enumerate(scored):
            for tokens, n in items:
                end = len(tokens) - 1
                wanted.append(([at.setdefault((r, p), len(at)) for p in range(end - n, end)], tokens[-n:]))
        logits = self.logits(rows, list(at))
        if self.pipeline is not None:
            return self._from_last_stage(None if logits is None else self._scores(logits, wanted))
        return self._scores(logits, wanted)

    def _from_last_stage(self, scores: list | None) -> list:
        box = [scores]
        dist.broadcast_object_list(box, src=self.pipeline.last_stage_rank(), group=self.pipeline.group)
        return box[0]

    @staticmethod
    def _scores(logits: torch.Tensor, wanted: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability of the targets, whether each is the argmax) per item, normalised in fp32."""
        index = torch.tensor([i for positions, _ in wanted for i in positions], device=logits.device)
        targets = torch.tensor([t for _, tokens in wanted for t in tokens], device=logits.device)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        picked = logprobs[index, targets].tolist()
        greedy = (logprobs.argmax(-1)[index] == targets).tolist()
        scores, start = [], 0
        for _, tokens in wanted:
            stop = start + len(tokens)
            scores.append((sum(picked[start:stop]), all(greedy[start:stop])))
            start = stop
        return scores

    def batches(self, rows: list[int], widths: list[int]) -> list[list[int]]:
        """Consecutive runs of `rows` (longest first) whose padded size stays within the token budget (and
        the row cap)."""
        batches, current = [], []
        for i in rows:
            width = widths[current[0]] if current else widths[i]
            full_batch = self.batch_size is not None and len(current) == self.batch_size
            if current and (full_batch or width * (len(current) + 1) > self.batch_tokens):
                batches.append(current)
                current = []
            current.append(i)
        return batches + ([current] if current else [])

    def score(self, items: list[Item]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each item's last n tokens, whether greedy decoding gives them all).

        An item whose input is a prefix of another's is scored from that one's forward pass (a causal
        model's logits over a prefix do not depend on what follows): the continuations of a
        multiple-choice question often share most of a row."""
        inputs = [tokens[:-1] for tokens, _ in items]
        owner = shared_rows(inputs)
        members: dict[int, list[int]] = {}
        for i, row in enumerate(owner):
            members.setdefault(row, []).append(i)
        rows = sorted(members, key=lambda r: (-len(inputs[r]), r))
        widths = [len(x) for x in inputs]
        found = {}
        for batch in self.batches(rows[self.shard :: self.shards], widths):
            scored = [[items[i] for i in members[r]] for r in batch]
            batch_items = [i for r in batch for i in members[r]]
            found.update(zip(batch_items, self._score_batch([inputs[r] for r in batch], scored), strict=True))
        merged = {k: v for part in self.penv.all_gather_object(found) for k, v in part.items()}
        return [merged[i] for i in range(len(items))]

    def _truncate(self, context: list[int], continuation: list[int]) -> Item:
        return (context + continuation)[-(self.seq_length + 1) :], len(continuation)

    # -- lm-eval's request types --------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        return self.score([self._truncate(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: disjoint windows of the model's context, each conditioned on what
        precedes it (lm-eval's rolling windows)."""
        items, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.seq_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                items.append(self._truncate(context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score(items), strict=True):
            totals[n] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string or max_gen_toks; requests dealt over the dp ranks."""
        args = [req.args for req in requests]
        mine = list(range(self.shard, len(args), self.shards))
        found = {}
        for i in mine:
            context, options = args[i]
            found[i] = self._generate(context, options)
        merged = {k: v for part in self.penv.all_gather_object(found) for k, v in part.items()}
        return [merged[i] for i in range(len(args))]

    def _generate(self, context: str, options: dict) -> str:
        until = options.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        tokens = self.tok_encode(context)
        generated: list[int] = []
        text = ""
        for _ in range(options.get("max_gen_toks", self.max_gen_tokens)):
            window = (tokens + generated)[-self.seq_length :]
            logits = self.logits([window], [(0, len(window) - 1)])
            last = None if logits is None else int(logits[0].argmax())
            token = self._from_last_stage(last) if self.pipeline is not None else last
            if token == self.eot_token_id:
                break
            generated.append(token)
            text = self.tok.decode(generated)
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text

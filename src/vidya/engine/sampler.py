"""Turn a step's logits into tokens, per request, in one mixed batch.

Order, as vLLM: logit_bias, min_tokens (EOS/stop ids masked), penalties, then greedy rows take
the argmax; the others get temperature, top-k, top-p, min-p and draw. A seeded request draws
from its own generator, so its text does not depend on what else shares the batch. Logprobs
are of the model's raw distribution (before any of the above).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vidya.engine.request import Request


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # per row, when asked: (sampled logprob, sampled rank, [(token_id, logprob), ...] top-k)
    logprobs: list[tuple[float, int, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, seed: int = 0, first_max=lambda logits: logits.max(dim=-1).indices) -> None:
        # first_max: index of each row's first maximum, from the ops backend (vidya.ops)
        self.first_max = first_max
        self.generator = torch.Generator().manual_seed(seed)
        self.request_generators: dict[str, torch.Generator] = {}

    def generator_for(self, req: Request) -> torch.Generator | None:
        seed = req.sampling_params.seed
        if seed is None or req.is_finished:  # (finished by a stop string while its step ran: discarded)
            return None
        g = self.request_generators.get(req.request_id)
        if g is None:
            g = torch.Generator().manual_seed(seed)
            self.request_generators[req.request_id] = g
        return g

    def forget(self, request_id: str) -> None:
        self.request_generators.pop(request_id, None)

    @classmethod
    def only_argmax(cls, requests: list[Request]) -> bool:
        """Whether every row just takes the argmax of the raw logits (greedy, no logprobs, nothing
        that adjusts logits): then the model may fuse the pick into its lm_head."""
        return all(r.sampling_params.greedy and r.sampling_params.logprobs is None and not cls._needs_adjust(r)
                   for r in requests)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        adjust = [i for i, r in enumerate(requests) if self._needs_adjust(r)]
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        if adjust or len(greedy) < len(requests) or any(r.sampling_params.logprobs is not None for r in requests):
            logits = logits.float()  # argmax alone is exact in the model's dtype
        raw = logits
        if adjust:  # copy only when some row changes: the raw logits give logprobs
            logits = logits.clone()
            for i in adjust:
                self._adjust(logits[i], requests[i])
        if len(greedy) == len(requests):  # the common benchmark case: one argmax, no gathers
            token_list = self.first_max(logits).tolist()
            return SamplerOutput(token_list, self._logprobs(raw, requests, token_list))
        dev = logits.device
        tokens = torch.empty(len(requests), dtype=torch.long, device=dev)
        if greedy:
            idx = torch.tensor(greedy, device=dev)
            tokens[idx] = logits[idx].argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=dev)
            probs = self._probs(logits[idx], [requests[i] for i in random_rows])
            tokens[idx] = self._draw(probs, [requests[i] for i in random_rows])
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(raw, requests, token_list))

    def _draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row from (unnormalised) probs by inverting the row's CDF at one uniform
        draw: one scalar per row from the request's own generator when it has a seed (its text
        then does not depend on what else shares the batch), else from the sampler's, one draw
        for all such rows. A whole vocabulary of exponentials per row costs ~0.8 ms a row here;
        this is one cumsum."""
        cdf = probs.cumsum(dim=-1)
        # rows without a seed draw together from the sampler's generator (one call, not one a
        # row: ~1 ms of host time at 256 rows), each seeded row from its own
        u = torch.rand(len(requests), generator=self.generator, dtype=cdf.dtype)
        for j, r in enumerate(requests):
            g = self.generator_for(r)
            if g is not None:
                u[j] = torch.rand((), generator=g, dtype=cdf.dtype)
        u = u.to(cdf.device)
        total = cdf[:, -1]
        u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
        # the first token whose CDF passes u: never one of zero probability
        return torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)

    @staticmethod
    def _needs_adjust(req: Request) -> bool:
        sp = req.sampling_params
        if sp.logit_bias or sp.uses_penalties:
            return True
        # (min_tokens is checked first: it is usually 0, and counting the output is not free)
        return bool(sp.min_tokens and req.num_output_tokens < sp.min_tokens
                    and (sp.stop_token_ids or (req.eos_token_ids and not sp.ignore_eos)))

    @staticmethod
    def _adjust(row: torch.Tensor, req: Request) -> None:
        sp = req.sampling_params
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=row.device)
        if sp.logit_bias:
            row[ids(list(sp.logit_bias.keys()))] += torch.tensor(list(sp.logit_bias.values()), dtype=row.dtype,
                                                                 device=row.device)
        if req.num_output_tokens < sp.min_tokens:
            banned = list(sp.stop_token_ids)
            if req.eos_token_ids and not sp.ignore_eos:
                banned.extend(req.eos_token_ids)
            if banned:
                row[ids(banned)] = float("-inf")
        if sp.uses_penalties:
            vocab = row.shape[0]
            out_ids = ids(req.output_token_ids)
            out_ids = out_ids[out_ids < vocab]
            counts = torch.bincount(out_ids, minlength=vocab).to(row.dtype)
            if sp.repetition_penalty != 1.0:
                seen = counts > 0
                prompt_ids = ids(req.prompt_token_ids)
                seen[prompt_ids[prompt_ids < vocab]] = True
                penalised = torch.where(row > 0, row / sp.repetition_penalty, row * sp.repetition_penalty)
                row.copy_(torch.where(seen, penalised, row))
            row -= sp.frequency_penalty * counts
            row -= sp.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        per_row = lambda values: torch.tensor(values, device=logits.device)
        temps = per_row([r.sampling_params.temperature for r in requests]).unsqueeze(1)
        logits = logits / temps
        top_ks = [r.sampling_params.top_k for r in requests]
        if any(top_ks):
            vocab = logits.shape[1]
            k = per_row([k if 0 < k < vocab else vocab for k in top_ks])
            sorted_vals = logits.sort(dim=-1, descending=True).values
            kth = sorted_vals.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_ps = per_row([r.sampling_params.top_p for r in requests])
        if (top_ps < 1.0).any():
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
            drop = before >= top_ps.unsqueeze(1)
            drop[:, 0] = False  # always keep the most likely token
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_ps = per_row([r.sampling_params.min_p for r in requests])
        if (min_ps > 0).any():
            cutoff = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
            probs = probs.masked_fill(probs < cutoff, 0.0)
        return probs

    @staticmethod
    def _logprobs(raw: torch.Tensor, requests: list[Request], tokens: list[int]):
        """Per row that asks: the sampled token's logprob and rank, and the top k, computed for
        all such rows at once and copied to the host in one go."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        out: list = [None] * len(requests)
        if not rows:
            return out
        dev = raw.device
        lp = torch.log_softmax(raw[torch.tensor(rows, device=dev)].float(), dim=-1)
        sampled = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=dev).unsqueeze(1))
        ranks = (lp > sampled).sum(dim=-1) + 1
        kmax = max(requests[i].sampling_params.logprobs for i in rows)
        vals, ids = lp.topk(kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long())
        sampled, ranks, vals, ids = (t.cpu() for t in (sampled.squeeze(1), ranks, vals, ids))
        for j, i in enumerate(rows):
            k = requests[i].sampling_params.logprobs
            out[i] = (float(sampled[j]), int(ranks[j]), list(zip(ids[j, :k].tolist(), vals[j, :k].tolist())))
        return out

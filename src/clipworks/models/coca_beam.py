"""Group beam search for CoCa captions, as OpenCLIP's `CoCa._generate_beamsearch` runs it with transformers'
`BeamSearchScorer` (4.56): the scorer rewritten here so that captions need no transformers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .coca import next_token_logits


class _Hypotheses:
    """The best `size` finished captions of one image in one beam group, scored by their summed scores over their
    length (transformers' BeamHypotheses with length_penalty=1, early_stopping=False)."""

    def __init__(self, size: int):
        self.size = size
        self.beams: list[tuple[float, Tensor]] = []
        self.worst_score = 1e9

    def add(self, tokens: Tensor, score_sum: float, length: int) -> None:
        score = score_sum / length
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_score_sum: float, length: int) -> bool:
        """Full, and no open beam can beat the worst kept (transformers' heuristic: at the current length)."""
        return len(self.beams) >= self.size and self.worst_score >= best_score_sum / length


def _select(hyps, done, group_ids: Tensor, scores: Tensor, tokens: Tensor, beams: Tensor, *, eos: int, pad: int):
    """One group's step for every image (BeamSearchScorer.process): of the 2 x group-size best (beam, token) pairs
    (B, 2G), those ending with `eos` among the top G become finished captions; the first G others continue.

    Returns the continuing beams' scores, tokens and rows in `group_ids` (B * G each)."""
    B, G = len(hyps), group_ids.shape[0] // len(hyps)
    next_scores = torch.zeros((B, G), dtype=scores.dtype)
    next_tokens = torch.zeros((B, G), dtype=tokens.dtype)
    next_rows = torch.zeros((B, G), dtype=beams.dtype)
    length = group_ids.shape[-1] + 1
    for b in range(B):
        if done[b]:  # finished: padding continues it (row 0, as the scorer does; nothing reads it)
            next_tokens[b] = pad
            continue
        kept = 0
        for rank, (token, score, beam) in enumerate(zip(tokens[b].tolist(), scores[b], beams[b].tolist())):
            row = b * G + beam
            if token == eos:
                if rank < G:
                    hyps[b].add(group_ids[row].clone(), score.item(), length)
            else:
                next_scores[b, kept], next_tokens[b, kept], next_rows[b, kept] = score, token, row
                kept += 1
            if kept == G:
                break
        done[b] = hyps[b].is_done(scores[b].max().item(), length)
    return next_scores.view(-1), next_tokens.view(-1), next_rows.view(-1)


def _finalize(hyps: list[list[_Hypotheses]], ids: Tensor, scores: Tensor, done: list[list[bool]], *, seq_len: int,
              eos: int, pad: int) -> Tensor:  # fmt: skip
    """The best caption of each image over its groups (BeamSearchScorer.finalize): open beams of unfinished groups
    join the finished ones; each is followed by `eos` where it fits, then `pad`."""
    B, Gn = len(hyps), len(hyps[0])
    G = ids.shape[0] // (B * Gn)
    best = []
    for b in range(B):
        for g in range(Gn):
            if not done[b][g]:
                for k in range(G):
                    row = (b * Gn + g) * G + k
                    hyps[b][g].add(ids[row], scores[row].item(), ids.shape[-1])
        candidates = sorted((beam for h in hyps[b] for beam in h.beams), key=lambda beam: beam[0])
        best.append(candidates[-1][1])
    lengths = [len(t) for t in best]
    width = min(max(lengths) + 1, seq_len)
    out = torch.full((B, width), pad, dtype=ids.dtype, device=ids.device)
    for b, tokens in enumerate(best):
        out[b, : lengths[b]] = tokens
        if lengths[b] < width:
            out[b, lengths[b]] = eos
    return out


def beam_search(model: nn.Module, images: Tensor, *, sot: int, eos: int, pad: int, seq_len: int, num_beams: int,
                num_beam_groups: int, process) -> Tensor:  # fmt: skip
    """Group beam search (Vijayakumar et al. 2016, without the diversity penalty, as OpenCLIP runs it): `num_beams`
    beams per image in `num_beam_groups` groups, each group's beams started from one beam (the others at -1e9), each
    ranked by summed processed logits (not log-probabilities, as OpenCLIP does). `process(tokens, logits)` is the
    logits processing (minimum length, repetition penalty). Returns (B, T) token ids, T <= seq_len."""
    if num_beams < 2 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beams ({num_beams}) must be at least 2 and a multiple of num_beam_groups "
                         f"({num_beam_groups})")  # fmt: skip
    B, G = images.shape[0], num_beams // num_beam_groups
    # OpenCLIP encodes each image once per beam; so here, for the same numbers
    image_tokens = model.visual.forward_caption_tokens(torch.repeat_interleave(images, num_beams, dim=0))
    ids = torch.full((B * num_beams, 1), sot, dtype=torch.long, device=images.device)  # (B * beams, 1)
    beam_scores = torch.full((B, num_beams), -1e9, dtype=torch.float, device=images.device)
    beam_scores[:, ::G] = 0  # one live beam per group, so that a group's beams do not all pick the same token
    beam_scores = beam_scores.view(-1)
    hyps = [[_Hypotheses(G) for _ in range(num_beam_groups)] for _ in range(B)]
    done = [[False] * num_beam_groups for _ in range(B)]
    while True:
        logits = next_token_logits(model, image_tokens, ids)  # (B * beams, V)
        V = logits.shape[-1]
        current = torch.zeros(B * num_beams, dtype=ids.dtype, device=ids.device)
        for g in range(num_beam_groups):
            rows = [b * num_beams + k for b in range(B) for k in range(g * G, (g + 1) * G)]
            group_ids = ids[rows]  # (B * G, L)
            scores = process(group_ids, logits[rows]) + beam_scores[rows].unsqueeze(-1)  # (B * G, V)
            top, flat = torch.topk(scores.view(B, G * V), 2 * G, dim=1, largest=True, sorted=True)  # (B, 2G)
            group_done = [d[g] for d in done]
            group_hyps = [h[g] for h in hyps]
            new_scores, new_tokens, picked = _select(group_hyps, group_done, group_ids, top, flat % V,
                                                     torch.div(flat, V, rounding_mode="floor"), eos=eos, pad=pad)  # fmt: skip
            for b in range(B):
                done[b][g] = done[b][g] or group_done[b]
            beam_scores[rows] = new_scores.to(beam_scores.device)
            ids[rows] = group_ids[picked.to(ids.device)]
            current[rows] = new_tokens.to(ids.device)
        ids = torch.cat([ids, current.unsqueeze(-1)], dim=-1)  # (B * beams, L + 1)
        if all(all(d) for d in done) or ids.shape[-1] >= seq_len:
            break
    return _finalize(hyps, ids, beam_scores, done, seq_len=seq_len, eos=eos, pad=pad)

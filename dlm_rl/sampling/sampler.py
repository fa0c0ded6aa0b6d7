"""The diffusion sampler and rollout engine: blocks left to right, a decoding rule per step, optional KV caches.

One code path serves LLaDA's reference sampler (a fixed number of tokens per step), Fast-dLLM's threshold and
factor decoding, and the prefix / dual KV caches; every call returns a `Trajectory`.

Batching: all rows work on the same decoding block. Each step forwards only the rows that still have masks in
that block, so rows may take different numbers of steps; a row that finishes (early stop) leaves the batch.

Caches (per block, refreshed at the block's first step, whose full forward also gives that step's logits):
- prefix: keys and values of the columns left of the block are reused for the block's later steps, which feed
  the block and everything right of it. A block-attention model's prefix is final, so its keys and values are
  kept from block to block: a block's first step feeds only the block before it (now final) and itself.
- dual: the masked suffix is cached too, so later steps feed only the block. transformers caches only append,
  so the refreshing forward feeds [prefix, suffix, block] with true position ids and each step re-feeds the
  block and crops it off the cache afterwards.
For block-attention models the block cannot see its suffix, nothing right of the block is fed, dual equals
prefix, and both are exact: the cached columns depend only on earlier blocks, which are final. For full
attention they are approximate: cached columns keep the values they had when the block started.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dlm_rl.models.attention import positional_mask
from dlm_rl.sampling.canvas import Canvas
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.decoding import (
    commit_factor,
    commit_threshold,
    commit_top_k,
    ordering_scores,
    sample_tokens,
    tokens_per_step,
)
from dlm_rl.sampling.trajectory import Trajectory


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    hints: torch.Tensor | None = None,
) -> Trajectory:
    """Sample `config.gen_length` response tokens after each left-padded prompt ([B, P] ids, 1/0 mask).

    `hints` [B, gen_length] (inpainting, as IGPO injects parts of a reference solution): token ids placed in the
    canvas before decoding, −1 where the sampler decides. A hint is never sampled or changed; in the trajectory it is
    not `sampled` (so no method trains on it), its step is −1 (visible in every visited state) and its log-prob NaN."""
    block_length = _block_length(model, config)
    _check_inputs(model, prompt_ids, prompt_mask, config)
    if hints is not None and (hints.shape != (prompt_ids.shape[0], config.gen_length)
                              or ((hints < -1) | (hints == model.mask_token_id)).any()):
        raise ValueError(f"hints must be [batch, gen_length] = [{prompt_ids.shape[0]}, {config.gen_length}] token "
                         f"ids, -1 where the sampler decides (never the mask id); got shape {tuple(hints.shape)}")
    canvas = Canvas.build(
        prompt_ids,
        prompt_mask,
        config.gen_length,
        block_length,
        model.mask_token_id,
        align_positions=model.attention == "block",
    )
    decoder = _Decoder(model, canvas, config, generator)
    if hints is not None:
        decoder.place(hints.to(decoder.x.device))
    for block in range(canvas.num_blocks):
        decoder.decode_block(block)
    return decoder.trajectory(prompt_ids, prompt_mask)


class _Decoder:
    """The canvas being decoded and its per-row records; `decode_block` runs the steps of one block."""

    def __init__(self, model, canvas: Canvas, config: SamplerConfig, generator):
        self.model, self.canvas, self.config, self.generator = model, canvas, config, generator
        self.x = canvas.ids.clone()  # [B, C]
        batch, columns = self.x.shape
        device = self.x.device
        self.step_of = torch.full((batch, columns), -1, dtype=torch.long, device=device)
        self.log_prob_of = torch.full((batch, columns), float("nan"), dtype=torch.float32, device=device)
        self.sampled = torch.zeros(batch, columns, dtype=torch.bool, device=device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)  # [B] forwards each row took part in
        self.running = torch.ones(batch, dtype=torch.bool, device=device)  # False once early stop finished a row
        tokenizer = model.tokenizer
        self.eos = tokenizer.eos_token_id if config.early_stop and tokenizer is not None else None
        self.prefix: _Prefix | None = None  # a block model's final columns' keys and values, kept across blocks
        self.cache_mode = config.cache
        if config.cache == "dual" and model.attention == "block":
            self.cache_mode = "prefix"  # the block cannot see its suffix: nothing right of it is fed or cached
        if config.cache != "none" and model.conventions.mask_format == "attention_bias":
            raise ValueError(
                "a backbone that takes its mask as attention_bias takes no position ids or KV cache; sample it with "
                "cache='none'"
            )

    def place(self, hints: torch.Tensor) -> None:
        """Write the hinted response tokens (≥ 0) into the canvas; a row whose hints already end it stops."""
        cols = self.canvas.response_cols
        given = hints >= 0
        self.x.scatter_(1, cols, torch.where(given, hints, self.x.gather(1, cols)))
        if self.eos is not None:
            self._stop_finished(torch.arange(self.x.shape[0], device=self.x.device))

    def masked(self, rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return (self.x[rows, lo:hi] == self.model.mask_token_id) & self.canvas.response[rows, lo:hi]

    def decode_block(self, block: int) -> None:
        config, bl = self.config, self.canvas.block_length
        lo = self.canvas.first_col + block * bl
        hi = lo + bl
        rows = torch.arange(self.x.shape[0], device=self.x.device)
        rows = rows[self.running & self.masked(rows, lo, hi).any(1)]  # [n]
        if not rows.numel():
            return
        if not config.parallel:
            schedule = self._schedule(self.masked(rows, lo, hi).sum(1))  # [n, S]
            step_in_block = torch.zeros_like(rows)
        forward = _BlockForward(self, lo, hi)
        while rows.numel():
            logits, policy_logits = forward(rows)  # [n, bl, V]
            broken = logits.isnan().flatten(1).any(1)  # [n]
            if broken.any():  # NaN would be sampled as some arbitrary token, or commit nothing and loop
                raise RuntimeError(
                    f"the model returned NaN logits for rows {rows[broken].tolist()} (check the dtype and the "
                    "attention mask)"
                )
            masked = self.masked(rows, lo, hi)  # [n, bl]
            tokens, log_probs = sample_tokens(logits, config.temperature, self.generator)
            scores = ordering_scores(logits, log_probs, config.remasking, self.generator)
            if config.threshold is not None:
                commit = commit_threshold(scores, log_probs.exp(), masked, config.threshold)
            elif config.factor is not None:
                commit = commit_factor(scores, log_probs.exp(), masked, config.factor)
            else:
                index = torch.arange(rows.numel(), device=rows.device)
                commit = commit_top_k(scores, masked, schedule[index, step_in_block])
                step_in_block += 1
            if policy_logits is not logits:  # guided sampling records the policy's own log-probs
                log_probs = policy_logits.double().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
            self.x[rows, lo:hi] = torch.where(commit, tokens, self.x[rows, lo:hi])
            self.step_of[rows, lo:hi] = torch.where(commit, self.steps[rows, None], self.step_of[rows, lo:hi])
            self.log_prob_of[rows, lo:hi] = torch.where(commit, log_probs.float(), self.log_prob_of[rows, lo:hi])
            self.sampled[rows, lo:hi] |= commit
            self.steps[rows] += 1
            if self.eos is not None:
                self._stop_finished(rows)
            keep = self.running[rows] & self.masked(rows, lo, hi).any(1)  # [n]
            rows = rows[keep]
            forward.keep(keep)
            if not config.parallel:
                schedule, step_in_block = schedule[keep], step_in_block[keep]

    def _schedule(self, masked_counts: torch.Tensor) -> torch.Tensor:
        """[n] masked tokens in the block -> [n, S] tokens to commit at each step (a row with fewer masked
        tokens than S steps commits one per step and finishes early)."""
        steps = self.config.steps_per_block(self.canvas.block_length)
        table = torch.zeros(masked_counts.numel(), steps, dtype=torch.long, device=masked_counts.device)
        for count in masked_counts.unique().tolist():
            counts = tokens_per_step(count, min(steps, count), self.config.schedule_shift)
            table[masked_counts == count, : len(counts)] = torch.tensor(counts, device=table.device)
        return table

    def _stop_finished(self, rows: torch.Tensor) -> None:
        """Fill with EOS the masks of rows whose EOS and everything left of it are committed."""
        mask_id, length = self.model.mask_token_id, self.config.gen_length
        cols = self.canvas.response_cols[rows]  # [n, R]
        response = self.x[rows[:, None], cols]
        masked = response == mask_id
        eos = response == self.eos
        first_masked = torch.where(masked.any(1), masked.long().argmax(1), length)
        first_eos = torch.where(eos.any(1), eos.long().argmax(1), length)
        done = first_eos < first_masked  # [n]
        fill = masked & done[:, None]  # [n, R]
        if fill.any():
            r = rows[:, None].expand_as(cols)[fill]
            c = cols[fill]
            self.x[r, c] = self.eos
            self.step_of[r, c] = self.steps[r] - 1
        self.running[rows[done]] = False

    def trajectory(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Trajectory:
        cols = self.canvas.response_cols  # [B, R]
        response = self.x.gather(1, cols)
        tokenizer = self.model.tokenizer
        eos = None if tokenizer is None else tokenizer.eos_token_id
        finished = (response == eos).any(1) if eos is not None else torch.zeros_like(self.running)
        return Trajectory(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response,
            step_map=self.step_of.gather(1, cols),
            log_probs=self.log_prob_of.gather(1, cols),
            sampled=self.sampled.gather(1, cols),
            nfe=self.steps.clone(),
            block_length=self.canvas.block_length,
            block_offset=self.canvas.block_offset,
            finish_reason=["eos" if f else "length" for f in finished.tolist()],
            eos_token_id=eos,
        )


class _BlockForward:
    """Logits of one block's columns for the given rows, through the configured cache."""

    def __init__(self, decoder: _Decoder, lo: int, hi: int):
        self.decoder, self.lo, self.hi = decoder, lo, hi
        model = decoder.model
        columns = decoder.x.shape[1]
        self.end = hi if model.attention == "block" else columns  # nothing right of a block is visible to it
        # With shifted logits token i is read from hidden state i-1: feed one column before the block.
        self.feed_from = lo - 1 if model.shift_logits and lo > 0 else lo
        # Nothing left of the block (a block model's first block) and nothing right of it: no columns to cache.
        nothing_cached = self.feed_from == 0 and (decoder.cache_mode == "prefix" or self.end == hi)
        self.mode = "none" if nothing_cached else decoder.cache_mode
        self.cache = None
        self.cached_cols = None
        device = decoder.x.device
        self.arange = lambda a, b: torch.arange(a, b, device=device)

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode, lo, hi, end, start = self.mode, self.lo, self.hi, self.end, self.feed_from
        if mode == "none":
            logits, policy = self._run(rows, self.arange(0, end))
            return logits[:, lo:hi], policy[:, lo:hi]
        if self.cache is None:  # the block's first step refreshes the cache
            if mode == "prefix":
                cached = self._final_prefix(rows)
                feed = self.arange(cached, end)
                logits, _ = self._run(rows, feed, use_cache=True)
                self.cache.crop(-(end - lo))
                self.cached_cols = self.arange(0, lo)
                if self.decoder.model.attention == "block":  # [0, lo) is final: later blocks reuse it
                    self.decoder.prefix = _Prefix(copy.deepcopy(self.cache), lo, rows.clone())
                block = logits[:, lo - cached : hi - cached]
                return block, block
            feed = torch.cat([self.arange(0, start), self.arange(hi, end), self.arange(start, hi)])
            logits, _ = self._run(rows, feed, use_cache=True)
            self.cache.crop(-(hi - lo))
            self.cached_cols = feed[: -(hi - lo)]
            return logits[:, -(hi - lo) :], logits[:, -(hi - lo) :]
        feed_end = end if mode == "prefix" else hi
        feed = self.arange(start, feed_end)
        logits, _ = self._run(rows, feed, duplicate_first=start < lo)
        self.cache.crop(-(feed_end - start))
        block = logits[:, lo - start : hi - start]
        return block, block

    def _final_prefix(self, rows: torch.Tensor) -> int:
        """Make the kept keys and values of a block model's final prefix this block's cache, for `rows`; the
        number of columns it covers (0: none kept, or a row without them, and the whole prefix is fed)."""
        prefix = self.decoder.prefix
        if prefix is None:
            return 0
        index = (prefix.rows[None, :] == rows[:, None]).long().argmax(1)  # each row's place in the kept cache
        if not torch.equal(prefix.rows[index], rows):
            self.decoder.prefix = None
            return 0
        if not torch.equal(index, torch.arange(len(prefix.rows), device=rows.device)):
            prefix.cache.batch_select_indices(index)  # rows that stopped leave it
        self.cache, self.cached_cols = prefix.cache, self.arange(0, prefix.columns)
        return prefix.columns

    def keep(self, keep: torch.Tensor) -> None:
        """Drop cache rows of rows that left the block."""
        if self.cache is not None and not keep.all():
            self.cache.batch_select_indices(keep.nonzero().squeeze(1))

    def _run(self, rows, feed, *, use_cache=False, duplicate_first=False):
        """Forward the `feed` columns of `rows` after the cached columns; (logits, unguided logits) [n, Q, V]."""
        decoder = self.decoder
        model, canvas, config = decoder.model, decoder.canvas, decoder.config
        keys = feed if self.cached_cols is None else torch.cat([self.cached_cols, feed])
        key_valid = canvas.valid[rows][:, keys]
        if duplicate_first:  # the re-fed column is already cached: it queries but is no second key
            key_valid[:, keys.numel() - feed.numel()] = False
        positions = canvas.positions[rows]
        ids = decoder.x[rows][:, feed]
        bias = positional_mask(
            positions[:, keys],
            key_valid,
            positions[:, feed],
            canvas.valid[rows][:, feed],
            model.attention,
            block_size=model.block_size,
            dtype=model.dtype,
        )
        query_positions = positions[:, feed]
        if config.cfg_scale:
            unconditional = ids.masked_fill(canvas.prompt[rows][:, feed], model.mask_token_id)
            both = model(
                torch.cat([ids, unconditional]),
                position_ids=query_positions.repeat(2, 1),
                attention_bias=bias.repeat(2, 1, 1, 1),
            ).logits
            policy, uncond = both.chunk(2)
            guided = uncond + (config.cfg_scale + 1) * (policy - uncond)
            return guided.masked_fill(policy.isneginf(), float("-inf")), policy  # -inf - -inf would be NaN
        out = model(
            ids,
            position_ids=query_positions,
            attention_bias=bias,
            past_key_values=self.cache,
            use_cache=use_cache or self.cache is not None,
        )
        if use_cache:
            self.cache = out.past_key_values
        return out.logits, out.logits


@dataclass
class _Prefix:
    """Keys and values of the final columns [0, columns) of the rows `rows`."""

    cache: object
    columns: int
    rows: torch.Tensor


def _block_length(model, config: SamplerConfig) -> int:
    if model.attention == "block":
        if config.block_length not in (None, model.block_size):
            raise ValueError(
                f"this model attends in blocks of {model.block_size} tokens; decoding blocks must match "
                f"(block_length={config.block_length})"
            )
        config.check_block_length(model.block_size)
        if not config.parallel:
            config.steps_per_block(model.block_size)
        return model.block_size
    return config.gen_length if config.block_length is None else config.block_length


def _check_inputs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: SamplerConfig) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [batch, length] tensor, got shape {tuple(prompt_ids.shape)}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}")
    lengths = prompt_mask.long().sum(1)
    if (lengths == 0).any():
        raise ValueError(f"prompts {(lengths == 0).nonzero().flatten().tolist()} are empty; every prompt needs a token")
    if (prompt_mask.long().diff(dim=1) < 0).any():
        raise ValueError("prompts must be left padded (padding before the tokens); see dlm_rl.data.collate.left_pad")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = int(lengths.max())
    if context is not None and longest + config.gen_length > context:
        raise ValueError(
            f"a prompt of {longest} tokens plus gen_length {config.gen_length} exceeds the model's context of "
            f"{context} positions; shorten the prompt or the generation"
        )

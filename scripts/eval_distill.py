"""Teacher vs distilled student across step counts: judge perplexity, unigram entropy, validity, distinct samples
and wall-clock seconds (discriminator passes included), on the testbed's unconditional fact chains.

Every model samples `--samples` responses after the task's prompt by ancestral sampling at each NFE (steps); the
student also with DiDi-Instruct's reward-guided sampler (its run's discriminator) at `--guided_nfe`, re-ranking
candidates in the last `--rerank_fraction` of the steps; `--guided_prior W` repeats those rows with the
discriminator's likelihood prior weight set to W (0: the learned discriminator alone). Ablated
students (`--ablation NAME=RUN_DIR`) are measured like the student with plain sampling, their rows marked with
`variant`. `--teacher_temperature` adds the teacher sampled at lower temperatures, rows marked with `temperature`:
sharpening alone also trades entropy for validity, so a student has to beat that frontier, not only the teacher.
`--teacher_schedule HIGH:LOW` adds the teacher with a temperature falling linearly from HIGH (every response token
masked) to LOW (none masked): sharper where more of the remaining tokens are revealed together.
Each model's row also gives `heldout_nll`, its negative ELBO per token on `--heldout` held-out texts (the same
masks for every model): unigram entropy hardly sees sharpening, but a sharpened model stops covering the data.

    python scripts/eval_distill.py --student runs/didi_tiny --ablation no_discriminator=runs/didi_no_disc

`--judge_url URL` takes judge perplexity from a served judge instead (docs/serving.md: its prompt
log-probabilities, `dlm_rl.judge.served_judge_perplexity`), e.g. a large AR model that shares the models'
tokenizer, served by `scripts/serve_vllm.sh start JUDGE_DIR`; `--judge_model` names it (default: the server's first).

Prints one JSON line per cell and, last, `{"results": [{"model", "nfe", "judge_ppl", "entropy", "validity",
"distinct", "seconds", ...}, ...]}`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import torch

NFES = [8, 16, 32, 64, 128, 1024]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="testbed:facts-teacher")
    parser.add_argument("--student", help="output_dir of a DiDi run (its final/ student and discriminator)")
    parser.add_argument("--ablation", action="append", default=[], help="NAME=RUN_DIR of an ablated DiDi run")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--nfe", type=int, nargs="+", default=NFES)
    parser.add_argument("--guided_nfe", type=int, nargs="*", default=[8, 16, 32],
                        help="NFEs of the guided sampler (each step adds discriminator passes)")
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=[30.0, 40.0],
                        help="the gradient guidance's scale: constant, or rising from the first to the second")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--rerank_fraction", type=float, default=0.5,
                        help="the share of the guided sampler's steps (the last ones) that re-rank candidates; the "
                             "others take gradient guidance (the paper's: 0.5)")
    parser.add_argument("--guided_prior", type=float, nargs="*", default=[],
                        help="also run the guided sampler with the discriminator's likelihood prior weight set to "
                             "each of these (0: its learned part alone); rows marked with likelihood_prior")
    parser.add_argument("--teacher_temperature", type=float, nargs="*", default=[],
                        help="also sample the teacher at these temperatures (< 1: sharper) at every NFE: the "
                             "baseline a student must beat")
    parser.add_argument("--teacher_schedule", type=_schedule, nargs="*", default=[], metavar="HIGH:LOW",
                        help="also sample the teacher at a temperature falling linearly from HIGH (all masked) to "
                             "LOW (none masked)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=128, help="held-out texts for heldout_nll (0: skip it)")
    parser.add_argument("--heldout_draws", type=int, default=4, help="mask draws per held-out text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge_url", help="an OpenAI-compatible server's API root serving the judge (vLLM)")
    parser.add_argument("--judge_model", help="with --judge_url: the served judge's name (default: the first)")
    args = parser.parse_args()
    if args.judge_model and not args.judge_url:
        parser.error("--judge_model needs --judge_url")
    if len(args.guidance_scale) > 2:
        parser.error("--guidance_scale takes one scale or a first and a last")
    guidance_scale = args.guidance_scale[0] if len(args.guidance_scale) == 1 else tuple(args.guidance_scale)
    if not all(0 <= weight < math.inf for weight in args.guided_prior):
        parser.error(f"--guided_prior weights must be finite and >= 0, got {args.guided_prior}")
    if args.guided_prior and not args.student:
        parser.error("--guided_prior needs --student (the run whose discriminator guides)")
    if not 0 <= args.rerank_fraction <= 1:
        parser.error(f"--rerank_fraction must be in [0, 1], got {args.rerank_fraction}")

    from dlm_rl.data.collate import DiffusionCollator
    from dlm_rl.diffusion.elbo import mdm_loss
    from dlm_rl.diffusion.noise import MCNoise
    from dlm_rl.judge import build_judge, judge_perplexity, load_judge, sample_quality, served_judge_perplexity
    from dlm_rl.models.loading import load
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.rl.didi import load_discriminator
    from dlm_rl.sampling.guided import ancestral_sample
    from dlm_rl.testbed import TASKS

    if any("=" not in spec for spec in args.ablation):
        parser.error(f"--ablation takes NAME=RUN_DIR, got {args.ablation}")
    task = TASKS[args.task]
    teacher = resolve_model(args.teacher).eval()
    tokenizer = teacher.tokenizer
    if args.judge_url:
        from dlm_rl.serving import Endpoint

        endpoint = Endpoint(args.judge_url, name="judge")
        judge_model = args.judge_model or endpoint.models()[0]
        perplexity = functools.partial(served_judge_perplexity, endpoint, judge_model)
    else:
        perplexity = functools.partial(judge_perplexity, load_judge(build_judge()))
    prompt = tokenizer(task.dataset("test", 1)[0]["prompt"], add_special_tokens=False)["input_ids"]
    prompt_ids = torch.tensor([prompt] * args.samples)
    prompt_mask = torch.ones_like(prompt_ids)
    results = []
    scheduled = {(high, low): _Tempered(teacher, 1.0, schedule=(high, low, task.response_length))
                 for high, low in args.teacher_schedule}  # one model each, so its held-out NLL is computed once
    if args.heldout:
        heldout = DiffusionCollator(tokenizer, task.response_length)(
            task.dataset("test", args.heldout, seed=args.seed + 1).to_list())
        noise = MCNoise.sample(heldout["response_mask"], n_t=args.heldout_draws,
                               generator=torch.Generator().manual_seed(args.seed))

    @functools.cache
    @torch.no_grad()
    def heldout_nll(model, temperature: float) -> float | None:
        if not args.heldout or temperature == 0:
            return None
        return float(mdm_loss(_Tempered(model, temperature), heldout["input_ids"], heldout["response_mask"], noise,
                              heldout["attention_mask"], draws_per_forward=1))

    def measure(model, label: str, nfe: int, discriminator=None, temperature: float = 1.0, **extra) -> None:
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        samples = ancestral_sample(model, prompt_ids, prompt_mask, task.response_length, nfe, generator=generator,
                                   discriminator=discriminator, guidance_scale=guidance_scale,
                                   candidates=args.candidates, temperature=temperature,
                                   rerank_fraction=args.rerank_fraction)
        if temperature != 1.0:
            extra = {**extra, "temperature": temperature}
        if discriminator is not None:
            extra = {**extra, "candidates": args.candidates, "rerank_fraction": args.rerank_fraction}
        seconds = time.perf_counter() - start
        row = {"model": label, "nfe": nfe, **extra,
               "judge_ppl": perplexity(prompt_ids, prompt_mask, samples.response_ids, tokenizer.eos_token_id),
               **sample_quality(samples.response_ids, tokenizer, task.generator),
               "seconds": round(seconds, 2), "forwards": samples.forwards,
               "heldout_nll": None if discriminator is not None else heldout_nll(model, temperature),
               "discriminator_passes": samples.discriminator_passes, "samples": args.samples}
        results.append(row)
        print(json.dumps(row), flush=True)

    for nfe in args.nfe:
        measure(teacher, "teacher", nfe)
        for temperature in args.teacher_temperature:
            measure(teacher, "teacher", nfe, temperature=temperature)
        for (high, low), model in scheduled.items():
            measure(model, "teacher", nfe, temperature_schedule=f"{high}:{low}")
    students = ([("", args.student)] if args.student else []) + [tuple(a.split("=", 1)) for a in args.ablation]
    for variant, run_dir in students:
        student = load(os.path.join(run_dir, "final")).eval()
        extra = {"variant": variant} if variant else {}
        for nfe in args.nfe:
            measure(student, "student", nfe, **extra)
        if variant:
            continue  # ablations are compared on plain sampling
        discriminator = load_discriminator(teacher, os.path.join(run_dir, "final")).eval()
        trained_prior = discriminator.likelihood_prior
        for nfe in args.guided_nfe:
            measure(student, "student_guided", nfe, discriminator)
            for weight in args.guided_prior:
                discriminator.likelihood_prior = weight
                measure(student, "student_guided", nfe, discriminator, likelihood_prior=weight)
                discriminator.likelihood_prior = trained_prior
    print(json.dumps({"results": results}))


def _schedule(text: str) -> tuple[float, float]:
    """`--teacher_schedule`'s HIGH:LOW, two temperatures above 0."""
    try:
        high, low = (float(t) for t in text.split(":"))
    except ValueError:
        high = low = 0.0
    if min(high, low) <= 0:
        raise argparse.ArgumentTypeError(f"takes HIGH:LOW, two temperatures above 0, got {text!r}")
    return high, low


class _Tempered(torch.nn.Module):
    """`model` with its logits divided by `temperature`: the conditionals its tempered samples are drawn from.
    With `schedule` (high, low, response length) each row's temperature is instead high · m + low · (1 − m), m the
    fraction of the response still masked in its input."""

    def __init__(self, model, temperature: float, schedule: tuple[float, float, int] | None = None):
        super().__init__()
        self.model, self.temperature, self.schedule = model, temperature, schedule
        self.mask_token_id = model.mask_token_id

    def forward(self, input_ids, *args, **kwargs):
        output = self.model(input_ids, *args, **kwargs)
        temperature = self.temperature
        if self.schedule is not None:
            high, low, length = self.schedule
            masked = (input_ids == self.mask_token_id).sum(1, keepdim=True).float() / length
            temperature = (high * masked + low * (1 - masked))[..., None]
        output.logits = output.logits / temperature
        return output


if __name__ == "__main__":
    main()

"""How well the likelihood prior of DiDi's discriminator tells data from the teacher's few-step samples.

Draws `--samples` real texts of the testbed task and as many teacher samples by ancestral sampling at `--nfe` steps,
noises both at each τ (every response token masked with probability τ) and scores them with the teacher's
pseudo-log-likelihood of the visible tokens (`dlm_rl.rl.didi.teacher_log_likelihood`, `--folds` forwards). Per τ:
the mean score of each side, the AUC (probability that a real text scores above a sample) and the Pearson r between
a sample's score and its validity.

    python scripts/discriminator_signal.py --nfe 8 --tau 0.02 0.1 0.3 0.6

Prints one JSON line per τ and, last, `{"results": [...]}`.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="testbed:facts-teacher")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--nfe", type=int, default=8)
    parser.add_argument("--tau", type=float, nargs="+", default=[0.02, 0.1, 0.3, 0.6])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from dlm_rl.data.collate import DiffusionCollator
    from dlm_rl.judge import validities
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.rl.didi import noise_at, teacher_log_likelihood
    from dlm_rl.sampling.guided import ancestral_sample
    from dlm_rl.testbed import TASKS

    task = TASKS[args.task]
    teacher = resolve_model(args.teacher).eval()
    rows = task.dataset("test", args.samples, seed=args.seed).to_list()
    batch = DiffusionCollator(teacher.tokenizer, task.response_length)(rows)
    real, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"].bool()
    generator = torch.Generator().manual_seed(args.seed)
    prompt_width = int((~response[0]).sum())
    samples = ancestral_sample(teacher, real[:, :prompt_width], attention[:, :prompt_width], task.response_length,
                               args.nfe, generator=generator)
    fake = torch.cat([real[:, :prompt_width], samples.response_ids], 1)
    validity = torch.tensor(validities(samples.response_ids, teacher.tokenizer, task.generator, rows),
                            dtype=torch.float64)
    results = []
    for tau in args.tau:
        t = torch.full((len(rows),), tau)
        scores = {}
        for name, ids in (("real", real), ("sample", fake)):
            noised, _ = noise_at(ids, response, t, teacher.mask_token_id, generator)
            scores[name] = teacher_log_likelihood(teacher, noised, attention, response, args.folds, generator).double()
        above = (scores["real"][:, None] > scores["sample"][None]).double()
        ties = (scores["real"][:, None] == scores["sample"][None]).double()
        row = {"tau": tau, "nfe": args.nfe, "folds": args.folds, "real_score": float(scores["real"].mean()),
               "sample_score": float(scores["sample"].mean()), "auc": float((above + ties / 2).mean()),
               "sample_validity": float(validity.mean()),
               "r_score_validity": float(torch.corrcoef(torch.stack([scores["sample"], validity]))[0, 1])}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()

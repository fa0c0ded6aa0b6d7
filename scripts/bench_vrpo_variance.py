"""The variance of VRPO's preference score ŝ and of its loss gradient over the estimator's noise.

For a fixed set of preference pairs and a fixed policy, draw the ELBO noise `--draws` times per cell and measure
Var[ŝ] (averaged over pairs) and the loss gradient's total variance over the LoRA parameters, E‖g − E g‖².
Cells: budgets n ∈ {1, 2, 4, 8} with one mask per timestep, the allocations (n_t, n_yt) ∈ {(8,1), (4,2), (2,4),
(1,8)} at n = 8, each with antithetic sampling on and off. The policies are the LoRA adapters of VRPO runs (`final/`
of their output_dir), given as STEPS=PATH; the pairs are on-policy best/worst pairs sampled once from the base model
with the recipe's reward, as in training.

    python scripts/bench_vrpo_variance.py --policy 20=runs/vrpo20/final --policy 200=runs/vrpo_tiny_math/final

Prints one JSON line per cell and, last, `{"results": [{"n", "n_t", "n_yt", "antithetic", "policy_steps",
"var_score", "var_grad"}, ...], "ratios": ...}`.
"""

from __future__ import annotations

import argparse
import json

import torch

CELLS = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2), (2, 4), (1, 8)]  # (n_t, n_yt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/vrpo_tiny_math.yaml")
    parser.add_argument("--policy", action="append", required=True, help="STEPS=PATH of a VRPO run's final adapter")
    parser.add_argument("--prompts", type=int, default=32, help="prompts to sample pairs from")
    parser.add_argument("--draws", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from peft import PeftModel

    from dlm_rl.model_spec import resolve_model
    from dlm_rl.recipe import parse_recipe
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.rl.vrpo import PreferenceEstimator, vrpo_loss
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig
    from dlm_rl.trainers.online import load_task
    from dlm_rl.trainers.vrpo import on_policy_pairs

    torch.manual_seed(args.seed)
    _, config = parse_recipe(args.recipe)
    data = load_task(config)
    train, gen_length = data.train, config.gen_length or data.response_length
    base = resolve_model(config.model)
    rewards = Rewards(config.reward_funcs, config.reward_weights)
    with LocalEngine(base, rows_per_chunk=512, seed=args.seed, rewards=rewards) as engine:
        trajectories = engine.generate(train[: args.prompts], config.num_generations,
                                       SamplerConfig(gen_length=gen_length, threshold=config.threshold,
                                                     temperature=config.temperature))
    chosen, rejected, counts = on_policy_pairs(trajectories, config.min_margin)
    results = []
    for spec in args.policy:
        steps, path = spec.split("=", 1)
        model = resolve_model(config.model)
        model.model = PeftModel.from_pretrained(model.model, path, is_trainable=True)
        parameters = [p for p in model.parameters() if p.requires_grad]
        for n_t, n_yt in CELLS:
            for antithetic in (True, False):
                estimator = PreferenceEstimator(n_t, n_yt, antithetic, config.estimator_form)
                generator = torch.Generator().manual_seed(args.seed)
                scores, grad_sum, grad_square_sum = [], 0.0, 0.0
                for _ in range(args.draws):
                    model.zero_grad(set_to_none=True)
                    loss, stats = vrpo_loss(model, chosen, rejected, estimator, config.beta, generator=generator)
                    loss.backward()
                    scores.append(stats["score"])
                    grad = torch.cat([p.grad.double().flatten() for p in parameters])
                    grad_sum = grad_sum + grad
                    grad_square_sum += float(grad @ grad)
                # E‖g − ḡ‖², the gradient's total variance (trace of its covariance), unbiased
                var_grad = (grad_square_sum - float(grad_sum @ grad_sum) / args.draws) / (args.draws - 1)
                row = {"n": n_t * n_yt, "n_t": n_t, "n_yt": n_yt, "antithetic": antithetic,
                       "policy_steps": int(steps), "var_score": float(torch.stack(scores).var(0).mean()),
                       "var_grad": var_grad, "pairs": counts["pairs"], "draws": args.draws}
                results.append(row)
                print(json.dumps(row), flush=True)
    ratios = {}
    for steps in sorted({r["policy_steps"] for r in results}):
        cell = {(r["n_t"], r["n_yt"], r["antithetic"]): r for r in results if r["policy_steps"] == steps}
        ratios[str(steps)] = {
            "var_score_(8,1)_antithetic_over_(1,8)_plain": cell[(8, 1, True)]["var_score"]
            / cell[(1, 8, False)]["var_score"],
            "var_score_antithetic_by_n": [cell[(n, 1, True)]["var_score"] for n in (1, 2, 4, 8)],
            "var_score_plain_by_n": [cell[(n, 1, False)]["var_score"] for n in (1, 2, 4, 8)],
        }
    print(json.dumps({"results": results, "ratios": ratios, "pairs": counts}))


if __name__ == "__main__":
    main()

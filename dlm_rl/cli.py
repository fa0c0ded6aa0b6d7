"""Command line: `dlm-rl train RECIPE.yaml [--key value ...]`, `dlm-rl sample`, `dlm-rl eval`."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlm-rl", description="RL post-training for diffusion language models")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a recipe", description="Run a YAML recipe; --key value overrides.")
    train.add_argument("recipe")

    sample = commands.add_parser("sample", help="sample completions from a model")
    _model_arguments(sample)
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sample.add_argument("--block-length", type=int, default=None)
    sample.add_argument("--steps", type=int, default=None)
    sample.add_argument("--temperature", type=float, default=0.0)
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser("eval", help="accuracy and pass@k of a model on a testbed task")
    _model_arguments(evaluate)
    evaluate.add_argument("--task", required=True, help="testbed task: addition3, chain, code")
    evaluate.add_argument("--n", type=int, default=256, help="held-out problems")
    evaluate.add_argument("--samples", type=int, default=8, help="completions per problem at temperature 1")
    evaluate.add_argument("--seed", type=int, default=1)

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "train":
            from dlm_rl.recipe import parse_recipe

            module, config = parse_recipe(args.recipe, rest)
            module.run(config)
        elif args.command == "sample":
            _sample(args)
        else:
            _eval(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"dlm-rl {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="tiny | smollm2 | testbed:NAME | a saved model path")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--gen-length", type=int, default=None, help="response canvas length")


def _load(args):
    from dlm_rl.models.resolve import resolve_model

    return resolve_model(args.model, trust_remote_code=args.trust_remote_code)


def _sample(args) -> None:
    import torch

    from dlm_rl.evaluation import complete
    from dlm_rl.sampling.config import SamplerConfig

    config = SamplerConfig(
        gen_length=args.gen_length or 32,
        block_length=args.block_length,
        steps=args.steps,
        temperature=args.temperature,
    )
    model = _load(args).eval()
    generator = torch.Generator(model.device).manual_seed(args.seed)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    for prompt, text in zip(prompts, complete(model, prompts, config, generator=generator)):
        print(json.dumps({"prompt": prompt, "completion": text}))


def _eval(args) -> None:
    from dlm_rl.evaluation import evaluate
    from dlm_rl.testbed import TASKS

    if args.task not in TASKS:
        raise ValueError(f"unknown testbed task {args.task!r}; choose one of {sorted(TASKS)}")
    task = TASKS[args.task]
    model = _load(args)
    held_out = task.dataset("test", args.n, seed=args.seed)
    result = evaluate(
        model, held_out, task.generator, gen_length=args.gen_length or task.response_length, samples=args.samples
    )
    print(json.dumps({"model": args.model, "task": args.task, **result}))


if __name__ == "__main__":
    sys.exit(main())

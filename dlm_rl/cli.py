"""Command line: `dlm-rl train RECIPE.yaml [--key value ...]` (`--help` after the recipe lists its keys),
`dlm-rl sample`, `dlm-rl eval`, `dlm-rl plot`, `dlm-rl convert`, `dlm-rl merge`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import asdict

from dlm_rl.sampling.config import CACHES, ORDERINGS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlm-rl", description="RL post-training for diffusion language models")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="run a recipe", add_help=False, usage="dlm-rl train RECIPE [--key value ...] [-h]",
        description="Run a YAML recipe: a trainer and its config keys. --key value overrides a key; a list is "
        "--key a b or --key '[a, b]'. `dlm-rl train RECIPE --help` lists every key of the recipe's trainer with "
        "its type, the recipe's value (else the default) and what it does.",
    )
    train.add_argument("recipe", nargs="?", metavar="RECIPE", help="a recipe file, e.g. recipes/tracerl_tiny_math.yaml")
    train.add_argument("-h", "--help", action="store_true", help="show this message, or with RECIPE its keys, and exit")

    sample = commands.add_parser("sample", help="sample completions from a model")
    _model_arguments(sample)
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sample.add_argument("--temperature", type=float, default=0.0)
    sample.add_argument("--num-samples", type=_positive_int, default=1)
    sample.add_argument("--trajectory", action="store_true", help="also print step_map, log-probs and NFE")
    sample.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser(
        "eval", help="accuracy, pass@k, NFE and tokens/s of a model on a dataset",
        description="Greedy accuracy and pass@k (T = 1) on a dataset; writes generations.jsonl, metrics.json and "
        "summary.md to --output-dir and prints one JSON line.",
    )
    _model_arguments(evaluate)
    evaluate.add_argument(
        "--dataset", "--task", dest="dataset", required=True,
        help="a testbed task (addition3, chain, chain128, code), humaneval (offline), reasoning_gym:NAME, "
        "gsm8k | math500 | mbpp (hub), or a local .jsonl/.json/.parquet with prompt + answer or prompt + tests "
        "(or GSM8K / MATH-500 / MBPP / HumanEval columns)",
    )
    evaluate.add_argument("--n", type=_positive_int, default=None,
                          help="first n problems (default all; 256 from generators)")
    evaluate.add_argument("--samples", type=_count, default=8, help="completions per problem at temperature 1")
    evaluate.add_argument(
        "--pass-k", type=_int_list, default=None, metavar="K,K,...",
        help="pass@k to report (default 1 and --samples)",
    )
    evaluate.add_argument("--seed", type=int, default=1, help="seed of generated problems and of the T = 1 samples")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, help="completions sampled together")
    evaluate.add_argument("--chat", action="store_true", help="send prompts through the tokenizer's chat template")
    evaluate.add_argument(
        "--prompt-template", default=None,
        help="the prompt as {prompt} inside this text, e.g. '{prompt} Answer in \\boxed{}.'",
    )
    evaluate.add_argument(
        "--truncate-prompts", action="store_true",
        help="keep the last tokens of prompts too long for the model's context (else they are an error)",
    )
    evaluate.add_argument("--output-dir", default=None, help="default eval/<model>-<dataset>")
    evaluate.add_argument(
        "--reward", action="append", default=[], metavar="REF",
        help="also score the greedy completions: module:function or path/to/file.py:function (repeatable)",
    )
    evaluate.add_argument("--reward-weight", type=float, action="append", help="one per --reward (default 1)")
    evaluate.add_argument("--reward-timeout", type=float, default=60.0, metavar="SECONDS",
                          help="a custom --reward call that takes longer is abandoned (its samples get no reward)")
    for command in (sample, evaluate):
        _sampler_arguments(command)

    plot = commands.add_parser("plot", help="draw a run's curves to PNG",
                               description="Draw the reward, accuracy, KL, NFE, time, loss and guard curves that a "
                               "run's metrics.jsonl holds into one PNG.")
    plot.add_argument("run_dir", help="a tracerl, vrpo or didi run's output_dir")
    plot.add_argument("--output", help="the PNG to write (default RUN_DIR/curves.png)")

    convert = commands.add_parser(
        "convert", help="write a checkpoint as a dlm-rl directory",
        description="Load a model as `dlm-rl train` would (a published LLaDA / Dream / SDAR / LLaDA2 checkpoint, a "
        "testbed name, ...) and write it to OUT as a dlm-rl directory: the native model's weights and config, the "
        "tokenizer and dlm_rl.json with the diffusion conventions. OUT loads with dlm_rl.models.load(OUT).",
    )
    convert.add_argument("model", help="the checkpoint to convert (a path, hub name, testbed:NAME, ...)")
    convert.add_argument("output", help="the directory to write; must not exist or be empty")
    convert.add_argument("--trust-remote-code", action="store_true")
    convert.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                         help="weights' dtype (default: as stored)")

    merge = commands.add_parser(
        "merge", help="merge a LoRA adapter into its base model",
        description="Load a saved LoRA adapter (e.g. a LoRA run's output_dir/final) on the base model its "
        "adapter_config.json names, merge the adapter into the weights and write OUT as a full dlm-rl directory, "
        "as `dlm-rl convert` writes one. OUT loads with dlm_rl.models.load(OUT), without PEFT.",
    )
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="a directory holding adapter_config.json and the "
                       "adapter's weights")
    merge.add_argument("output", metavar="OUT", help="the directory to write; must not exist or be empty")
    merge.add_argument("--trust-remote-code", action="store_true", help="the base model runs its own code")
    merge.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="dtype to load the base in, merge and write (default: the base's as stored)")

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "train" and args.recipe is None:
        if args.help:
            train.print_help()
            return 0
        train.error("the following arguments are required: RECIPE")
    try:
        if args.command == "train":
            from dlm_rl.recipe import describe_keys, parse_recipe

            if args.help:
                print(describe_keys(args.recipe))
                return 0
            module, config = parse_recipe(args.recipe, rest)
            _exit_on_sigterm()
            module.run(config)
        elif args.command == "sample":
            _sample(args)
        elif args.command == "plot":
            _plot(args)
        elif args.command == "convert":
            _convert(args)
        elif args.command == "merge":
            _merge(args)
        else:
            _eval(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as error:
        print(f"dlm-rl {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _exit_on_sigterm() -> None:
    """Schedulers and `kill` stop a job with SIGTERM, whose default action ends the process at once. Exit through
    the interpreter instead, as Ctrl-C does, so the trainer's `finally` still saves final/ and closes the log."""

    def stop(signum, frame):
        logging.getLogger("dlm_rl").warning("SIGTERM: stopping; the model so far goes to output_dir/final")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _int_list(text: str) -> list[int]:
    """'1,2,8' → [1, 2, 8]."""
    try:
        return [_positive_int(k) for k in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, like 1,2,8; got {text!r}") from None


def _whole(least: int):
    """An argparse type: a whole number of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, got {text!r}")
        return value

    return parse


_count, _positive_int = _whole(0), _whole(1)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="tiny | smollm2 | testbed:NAME | a saved model path")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--gen-length", type=_positive_int, default=None, help="response canvas length")


def _sampler_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler")
    group.add_argument("--block-length", type=_positive_int, default=None)
    group.add_argument("--steps", type=_positive_int, default=None,
                       help="fixed schedule: total steps (default gen-length)")
    group.add_argument("--threshold", type=float, default=None, help="Fast-dLLM confidence threshold, e.g. 0.9")
    group.add_argument("--factor", type=float, default=None, help="Fast-dLLM factor rule, e.g. 1.0")
    group.add_argument("--cache", choices=CACHES, default="none")
    group.add_argument("--remasking", choices=ORDERINGS, default="low_confidence")
    group.add_argument("--cfg-scale", type=float, default=0.0)
    group.add_argument("--no-early-stop", dest="early_stop", action="store_false")


def _sampler_options(args) -> dict:
    names = ("block_length", "steps", "threshold", "factor", "cache", "remasking", "cfg_scale", "early_stop")
    return {name: getattr(args, name) for name in names}


def _refuse_to_overwrite(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} exists and is not an empty directory; choose a new one")


def _convert(args) -> None:
    from dlm_rl.model_spec import resolve_model

    _refuse_to_overwrite(args.output)
    model = resolve_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    model.save_pretrained(args.output)
    print(json.dumps({"model": args.model, "output": args.output, "class": type(model.model).__name__,
                      "dtype": str(model.dtype).removeprefix("torch."), **asdict(model.conventions)}))


def _merge(args) -> None:
    from dlm_rl.models import load

    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")) or \
            os.path.isfile(os.path.join(args.adapter, "config.json")):
        raise ValueError(f"{args.adapter} holds no LoRA adapter on its own (adapter_config.json and the adapter's "
                         "weights, without a full model's config.json); give the directory a LoRA run saved, "
                         "e.g. its output_dir/final")
    _refuse_to_overwrite(args.output)
    model = load(args.adapter, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    model.model = model.model.merge_and_unload()
    model.save_pretrained(args.output)
    print(json.dumps({"adapter": args.adapter, "output": args.output, "class": type(model.model).__name__,
                      "dtype": str(model.dtype).removeprefix("torch."), **asdict(model.conventions)}))


def _load(args):
    from dlm_rl.model_spec import resolve_model

    return resolve_model(args.model, trust_remote_code=args.trust_remote_code)


def _sample(args) -> None:
    import torch

    from dlm_rl.evaluation import decode_responses, rollout
    from dlm_rl.sampling.config import SamplerConfig

    config = SamplerConfig(gen_length=args.gen_length or 32, temperature=args.temperature, **_sampler_options(args))
    model = _load(args).eval()
    generator = torch.Generator(model.device).manual_seed(args.seed)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    (trajectory,) = rollout(model, prompts, config, batch_size=len(prompts), generator=generator)
    texts = decode_responses(model.tokenizer, trajectory.response_ids)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        line = {"prompt": prompt, "completion": text, "nfe": int(trajectory.nfe[i])}
        line["finish_reason"] = trajectory.finish_reason[i]
        if args.trajectory:
            line["response_ids"] = trajectory.response_ids[i].tolist()
            line["step_map"] = trajectory.step_map[i].tolist()
            line["log_probs"] = [round(x, 6) if x == x else None for x in trajectory.log_probs[i].tolist()]
        print(json.dumps(line))


def _eval(args) -> None:
    from dlm_rl.data.benchmarks import load_benchmark
    from dlm_rl.eval_report import default_output_dir, write_report
    from dlm_rl.evaluation import run_evaluation
    from dlm_rl.sampling.config import SamplerConfig

    benchmark = load_benchmark(args.dataset, n=args.n, seed=args.seed)
    gen_length = args.gen_length or benchmark.gen_length
    if gen_length is None:
        raise ValueError(f"dataset {args.dataset!r} needs --gen-length (the response canvas, e.g. 256)")
    rows = benchmark.rows
    if args.prompt_template is not None:
        if "{prompt}" not in args.prompt_template:
            raise ValueError(f"--prompt-template {args.prompt_template!r} has no {{prompt}} placeholder")
        rows = rows.map(lambda row: {"prompt": args.prompt_template.replace("{prompt}", row["prompt"])})
    if args.chat:
        rows = rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    SamplerConfig(gen_length=gen_length, **_sampler_options(args))  # a bad sampler setting fails before the model loads
    rewards = None
    if args.reward:
        from dlm_rl.reward_functions import Rewards

        rewards = Rewards(args.reward, args.reward_weight, timeout=args.reward_timeout)
    elif args.reward_weight:
        raise ValueError("--reward-weight given without --reward")
    model = _load(args)
    result, records = run_evaluation(
        model,
        rows,
        benchmark.scorer,
        gen_length=gen_length,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sampler=_sampler_options(args),
        rewards=rewards,
        truncate_prompts=args.truncate_prompts,
        pass_k=args.pass_k,
    )
    output_dir = args.output_dir or default_output_dir(args.model, args.dataset)
    settings = {**vars(args), "gen_length": gen_length, "scorer": benchmark.scorer}
    paths = write_report(output_dir, settings, result, records)
    print(json.dumps({"model": args.model, "dataset": args.dataset, **result, **paths}))


def _plot(args) -> None:
    from dlm_rl.run_log import plot_curves

    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{args.run_dir} has no metrics.jsonl; give the output_dir of a tracerl, vrpo or didi "
                                "run (mdm runs log through the transformers Trainer: set report_to: tensorboard)")
    output = args.output or os.path.join(args.run_dir, "curves.png")
    panels = plot_curves(metrics, output)
    print(f"wrote {output}: {', '.join(panels)}")


if __name__ == "__main__":
    sys.exit(main())

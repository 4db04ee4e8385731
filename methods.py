"""The table of prefill methods, and the command-line options made from their configs.

engine.py, eval/ and bench.py read METHODS; adding a method is one module with a config dataclass
and a prefill function (prefill.py says what they look like), and one entry here.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields

import baselines
import distributed
import hybrid
import infinipot
import locret
import parallelcomp


@dataclass(frozen=True)
class Method:
    prefill: Callable  # (model, prompt, config, answer_budget, on_progress) -> Prefilled
    config: type  # its frozen config dataclass, fields declared with prefill.option
    needs_question: bool  # scores the context by the question: a missing one is the document's last paragraph
    summary: str


METHODS = {
    "parallelcomp": Method(distributed.prefill, parallelcomp.ParallelCompConfig, True,  # over torchrun's processes
                           "chunks encoded in parallel, the least relevant to the question evicted"),
    "full": Method(baselines.prefill_full, baselines.BaselineConfig, False,
                   "plain causal attention over the whole prompt"),
    "truncate": Method(baselines.prefill_truncate, baselines.BaselineConfig, False,
                       "the first and last halves of what the trained window leaves"),
    "streaming": Method(baselines.prefill_streaming, baselines.BaselineConfig, False,
                        "StreamingLLM: attention sinks and a recent window"),
    "yarn": Method(baselines.prefill_yarn, baselines.YarnConfig, False, "full attention with YaRN"),
    "infinipot": Method(infinipot.prefill, infinipot.InfiniPotConfig, False,
                        "InfiniPot: a fixed-size pot distilled by novelty and a catalyst prompt's attention"),
    "locret": Method(locret.prefill, locret.LocretConfig, False,
                     "Locret: trained retaining heads keep the top-B entries per KV head as chunks stream in"),
    "hybrid": Method(hybrid.prefill, hybrid.HybridConfig, False,
                     "LongGen's pattern: the middle third of the layers full attention, the others sink + window"),
}


def prepared(config, model, encode):
    """`config` ready for prefill on `model`: a config whose options need the model or the
    tokenizer (InfiniPot's catalyst text, Locret's head file) defines prepared(model, encode),
    which returns it with those resolved; encode: str -> ids without BOS."""
    return config.prepared(model, encode) if hasattr(config, "prepared") else config


def flag(f):
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def dest(method, f):
    return f"{method}.{f.name}"


def argument_type(parse):
    """argparse's converter for a parser: builtins as argparse names them, others with their message."""
    if parse in (int, float, str):
        return parse

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    convert.__name__ = parse.__name__
    return convert


def add_options(parser, names=METHODS):
    """One argument group per method, with a flag per config field; a flag not given is not set."""
    for name in names:
        group = parser.add_argument_group(f"--method {name}")
        for f in fields(METHODS[name].config):
            meta = f.metadata
            default = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag(f), dest=dest(name, f), type=argument_type(meta["parse"]),
                               default=argparse.SUPPRESS, metavar=meta["metavar"], help=meta["help"] + default)


def given_options(args):
    """{method: {field: value}} of the flags given on the command line."""
    given = {}
    for key, value in vars(args).items():
        name, _, field = key.partition(".")
        if name in METHODS and field:
            given.setdefault(name, {})[field] = value
    return given


def config_from(name, options):
    return METHODS[name].config(**options.get(name, {}))


def flag_of(name, param):
    """The command-line flag of config field `param` of method `name`, or None."""
    return next((flag(f) for f in fields(METHODS[name].config) if f.name == param), None)


def parse_specs(specs, args):
    """--methods items METHOD[:FLAG=VALUE,...] -> {label: (method, config)}: the label is the item,
    the flags inside it override those given outside (every run's defaults). Lets an evaluation
    run one method in several settings: parallelcomp parallelcomp:kv-budget=512."""
    base, runs = given_options(args), {}
    for spec in specs:
        name, _, overrides = spec.partition(":")
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {name!r} in {spec!r} (choose from {', '.join(METHODS)})")
        parser = argparse.ArgumentParser(prog=spec, add_help=False, exit_on_error=False)
        add_options(parser, [name])
        argv = [f"--{item}" for item in overrides.split(",") if item]
        try:
            parsed, unknown = parser.parse_known_args(argv)
        except argparse.ArgumentError as e:
            raise argparse.ArgumentTypeError(f"{spec}: {e}")
        if unknown:
            raise argparse.ArgumentTypeError(f"{spec}: {unknown[0]} is not an option of --method {name}")
        extra = given_options(parsed)
        runs[spec] = (name, config_from(name, {name: {**base.get(name, {}), **extra.get(name, {})}}))
    return runs

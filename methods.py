"""The table of prefill methods, and the command-line options made from their configs.

engine.py, eval/ and bench.py reach a method only through METHODS: its entry carries all they need
of it. Adding a method is one module with a config dataclass, a prefill function and an open
function for sessions (prefill.py says what they look like), and one entry here.
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
import parallelcomp_session


@dataclass(frozen=True)
class Method:
    prefill: Callable  # (model, prompt, config, answer_budget, on_progress) -> Prefilled
    config: type  # its frozen config dataclass, fields declared with prefill.option; validate(model_config)
    needs_question: bool  # scores the context by the question: a missing one is the document's last paragraph
    summary: str
    # (model, prompt, config, answer_budget, limit, on_progress) -> the encoding of a session
    # (Engine.open): prompt's head and context encoded once, ask(prompt, answer_budget, on_progress)
    # -> the Prefilled of prefill for each question (prefill.py)
    open: Callable
    # (config, model, encode) -> the config with the options that need the model or the tokenizer
    # resolved (InfiniPot's catalyst text, Locret's head file); encode: str -> ids without BOS
    prepare: Callable | None = None
    # (config.json as a dict, the model's ModelConfig) -> the config a checkpoint was trained for, or
    # None; a bad entry raises ValueError naming its key. Under auto the checkpoint runs this method.
    from_checkpoint: Callable | None = None
    memory_options: tuple = ()  # config fields that bound its memory: what an out-of-memory message says to lower
    spans_processes: bool = False  # divides its work among the processes of a run; any other runs whole in each

    def ready(self, config, model, encode):
        """`config` validated against the model and prepared for prefill."""
        config.validate(model.config)
        return config if self.prepare is None else self.prepare(config, model, encode)


METHODS = {
    "parallelcomp": Method(distributed.prefill, parallelcomp.ParallelCompConfig, True,  # over the processes of a run
                           "chunks encoded in parallel, the least relevant to the question evicted",
                           open=parallelcomp_session.ParallelCompEncoding,  # one process
                           memory_options=("chunk_tokens", "top_k_chunks", "kv_budget"), spans_processes=True),
    "full": Method(baselines.prefill_full, baselines.BaselineConfig, False,
                   "plain causal attention over the whole prompt", open=baselines.open_full),
    "truncate": Method(baselines.prefill_truncate, baselines.BaselineConfig, False,
                       "the first and last halves of what the trained window leaves", open=baselines.open_truncate),
    "streaming": Method(baselines.prefill_streaming, baselines.BaselineConfig, False,
                        "StreamingLLM: attention sinks and a recent window", open=baselines.StreamingEncoding),
    "yarn": Method(baselines.prefill_yarn, baselines.YarnConfig, False, "full attention with YaRN",
                   open=baselines.open_yarn),
    "infinipot": Method(infinipot.prefill, infinipot.InfiniPotConfig, False,
                        "InfiniPot: a fixed-size pot distilled by novelty and a catalyst prompt's attention",
                        open=infinipot.PotEncoding, prepare=infinipot.InfiniPotConfig.prepared,
                        memory_options=("pot_tokens",)),
    "locret": Method(locret.prefill, locret.LocretConfig, False,
                     "Locret: trained retaining heads keep the top-B entries per KV head as chunks stream in",
                     open=locret.RetainedEncoding, prepare=locret.LocretConfig.prepared,
                     memory_options=("budget", "locret_chunk")),
    "hybrid": Method(hybrid.prefill, hybrid.HybridConfig, False,
                     "LongGen's pattern: the middle third of the layers full attention, the others sink + window",
                     open=hybrid.HybridEncoding, from_checkpoint=hybrid.layout_from_config,
                     memory_options=("window_tokens", "sink_tokens", "local_blocks", "block_tokens")),
}
# auto (Engine.plan decides): the method a checkpoint was trained for (from_checkpoint), else AUTO_FITS
# when the prompt and the answer fit the trained window, else AUTO_LONG
AUTO = "auto"
AUTO_FITS, AUTO_LONG = "full", "parallelcomp"
AUTO_CANDIDATES = (AUTO_FITS, AUTO_LONG, *(name for name, m in METHODS.items() if m.from_checkpoint))


def checkpoint_configs(hf, model_config):
    """{method: config} of the methods a checkpoint was trained for, from its config.json (hf, a
    dict): hybrid's layout where it has a `hybrid_attention` entry. ValueError names a bad key."""
    configs = {name: m.from_checkpoint(hf, model_config) for name, m in METHODS.items() if m.from_checkpoint}
    return {name: config for name, config in configs.items() if config is not None}


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


class HelpFormatter(argparse.HelpFormatter):
    """--help with "(default: X)" after an option's help where it has a default its help does not
    already give (add_options writes the methods' own: their flags are not set when not given)."""

    def _get_help_string(self, action):
        unsaid = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        return action.help + " (default: %(default)s)" if unsaid and "default" not in action.help else action.help


def add_options(parser, names=METHODS):
    """One argument group per method, with a flag per config field; a flag not given is not set.
    A field without a metavar is a count: N."""
    for name in names:
        group = parser.add_argument_group(f"--method {name}")
        for f in fields(METHODS[name].config):
            meta = f.metadata
            default = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag(f), dest=dest(name, f), type=argument_type(meta["parse"]),
                               default=argparse.SUPPRESS, metavar=meta["metavar"] or "N",
                               help=meta["help"] + default)


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


def flag_of(param, names=METHODS):
    """The command-line flag of config field `param` of the methods `names` (field names are
    unique across the table), or None."""
    return next((flag(f) for name in names for f in fields(METHODS[name].config) if f.name == param), None)


def parse_specs(specs, args):
    """--methods items METHOD[:FLAG=VALUE,...] -> {label: (method, {field: value})}: the label is
    the item, the flags inside it override those given outside (every run's defaults); the engine
    merges them over the checkpoint's config of the method. Lets an evaluation run one method in
    several settings: parallelcomp parallelcomp:kv-budget=512."""
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
        runs[spec] = (name, {**base.get(name, {}), **extra.get(name, {})})
    return runs

"""methods.py: the table's configs declare every field with prefill.option, the command-line
options made from them round-trip to configs, and evaluation specs (METHOD:FLAG=VALUE,...) parse."""

import argparse
from dataclasses import fields, is_dataclass

import pytest

from engine import parse_args
from methods import METHODS, add_options, config_from, flag_of, given_options, parse_specs
from parallelcomp import Calibration

# every config field: a command-line value and what it parses to
SAMPLES = {
    "chunk_tokens": ("300", 300), "top_k_chunks": ("2", 2), "kv_budget": ("64", 64),
    "calibration": ("sink:1-2", Calibration("sink", 1, 2)),
    "pot_tokens": ("256", 256), "pot_keep": ("128", 128), "nuc_ratio": ("0.25", 0.25),
    "catalyst": ("question", "question"),
    "budget": ("96", 96), "locret_chunk": ("48", 48), "stabilizers": ("24", 24),
    "retaining_heads": ("heads.safetensors", "heads.safetensors"),
    "pattern": ("block", "block"), "sink_tokens": ("8", 8), "window_tokens": ("56", 56), "block_tokens": ("16", 16),
    "local_blocks": ("4", 4), "vert_stride": ("2", 2), "full_layers": ("1-2", (1, 2)),
    "kv_placement": ("sharded", "sharded"), "cut_at": ("sentence", "sentence"), "factor": ("2.5", 2.5),
}


def all_fields():
    return [(name, f) for name, method in METHODS.items() for f in fields(method.config)]


def test_every_config_field_is_an_option():
    for name, method in METHODS.items():
        config = method.config
        assert is_dataclass(config) and config.__dataclass_params__.frozen, name
        assert callable(getattr(config, "validate", None)), name
        config()  # every field has a default
    for name, f in all_fields():
        assert set(f.metadata) == {"help", "parse", "flag", "metavar"}, (name, f.name)
        assert isinstance(f.metadata["help"], str) and f.metadata["help"], (name, f.name)
        assert callable(f.metadata["parse"]), (name, f.name)
    assert sorted(f.name for _, f in all_fields()) == sorted(SAMPLES), "a value to parse for every field"


def test_flags_are_unique_and_clash_with_no_engine_option():
    flags = [flag_of(f.name, [name]) for name, f in all_fields()]
    assert len(flags) == len(set(flags)) and all(flag.startswith("--") for flag in flags)
    names = [f.name for _, f in all_fields()]
    assert len(names) == len(set(names)), "a field names one option: flag_of and error messages find its flag"
    assert flag_of("calibration") == flag_of("calibration", ["parallelcomp"]) == "--calibrate"
    assert flag_of("kv_budget") == "--kv-budget"
    assert flag_of("kv_budget", ["full"]) is None and flag_of("max_new_tokens") is None
    parse_args(["--prompt", "p.txt"])  # argparse refuses a flag defined twice


def test_options_round_trip_to_configs():
    for name, method in METHODS.items():
        parser = argparse.ArgumentParser()
        add_options(parser)
        assert given_options(parser.parse_args([])) == {}  # flags not given are not set
        argv, values = [], {}
        for f in fields(method.config):
            text, value = SAMPLES[f.name]
            argv += [flag_of(f.name, [name]), text]
            values[f.name] = value
        given = given_options(parser.parse_args(argv))
        assert given == ({name: values} if values else {})
        assert config_from(name, given) == method.config(**values)
        assert config_from(name, {}) == method.config()


def test_parse_specs():
    parser = argparse.ArgumentParser()
    add_options(parser)
    outside = parser.parse_args(["--top-k-chunks", "2", "--chunk-tokens", "400"])  # every run's defaults
    specs = ["parallelcomp", "parallelcomp:kv-budget=64,calibrate=sink:1-2", "parallelcomp:top-k-chunks=1",
             "full", "infinipot:pot-tokens=256,catalyst=question"]
    assert parse_specs(specs, outside) == {  # the overrides the engine merges over the checkpoint's config
        "parallelcomp": ("parallelcomp", dict(chunk_tokens=400, top_k_chunks=2)),
        "parallelcomp:kv-budget=64,calibrate=sink:1-2": (
            "parallelcomp", dict(chunk_tokens=400, top_k_chunks=2, kv_budget=64, calibration=Calibration("sink", 1, 2))),
        "parallelcomp:top-k-chunks=1": ("parallelcomp", dict(chunk_tokens=400, top_k_chunks=1)),
        "full": ("full", {}),
        "infinipot:pot-tokens=256,catalyst=question": ("infinipot", dict(pot_tokens=256, catalyst="question")),
    }
    alone = parse_specs(["parallelcomp:kv-budget=64,calibrate=sink:1-2"], parser.parse_args([]))
    assert alone == {"parallelcomp:kv-budget=64,calibrate=sink:1-2": (
        "parallelcomp", dict(kv_budget=64, calibration=Calibration("sink", 1, 2)))}
    locret = parse_specs(["locret:budget=96"], parser.parse_args([]))
    assert locret == {"locret:budget=96": ("locret", dict(budget=96))}


@pytest.mark.parametrize("spec, message", [
    ("parallelcomp:window=3", "parallelcomp:window=3: --window=3 is not an option of --method parallelcomp"),
    ("full:kv-budget=64", "full:kv-budget=64: --kv-budget=64 is not an option of --method full"),
    ("parallelcomp:kv-budget=many", "parallelcomp:kv-budget=many: argument --kv-budget: invalid int value: 'many'"),
    ("parallelcomp:calibrate=sink", "parallelcomp:calibrate=sink: argument --calibrate: 'sink': expected REGION"),
    ("nosuch", "unknown method 'nosuch' in 'nosuch' (choose from parallelcomp, full, "),
    ("nosuch:kv-budget=64", "unknown method 'nosuch' in 'nosuch:kv-budget=64'"),
])
def test_bad_specs_are_argument_type_errors(spec, message):
    parser = argparse.ArgumentParser()
    add_options(parser)
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse_specs(["full", spec], parser.parse_args([]))
    assert str(e.value).startswith(message), str(e.value)

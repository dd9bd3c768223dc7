"""The generation options, declared once: each one's name, default, command-line flag and help.

The table drives everything that lists them: the keyword arguments of Model.generate, chat and
Conversation.send (a test holds their signatures to it), resolve() (argument, else the model's
generation_config.json, else the default), and the `gally run`/`chat` flags (an error names the
flag as typed: cli.typed_flags). Defaults are llama.cpp's sampling defaults and mlx-lm's max_tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    flags: tuple[str, ...]  # on the command line
    help: str
    metavar: Optional[str] = None
    type: Any = None               # argparse type; None for repeatable strings (stop), "flag" for a switch
    from_generation_config: bool = False  # a model folder's generation_config.json may set it


OPTIONS = (
    Option("max_new_tokens", 256, ("-n", "--max-tokens"), "most tokens to generate; -1: until the context is full",
           "N", int, True),
    Option("temperature", 0.8, ("--temp", "--temperature"), "temperature; 0 is greedy", "T", float, True),
    Option("top_k", 40, ("--top-k",), "keep the k likeliest tokens; 0 disables", "K", int, True),
    Option("top_p", 0.95, ("--top-p",), "nucleus mass; 1 disables", "P", float, True),
    Option("min_p", 0.05, ("--min-p",), "drop tokens below min_p × the top probability; 0 disables", "P", float, True),
    Option("repetition_penalty", 1.0, ("--repeat-penalty",), "penalty for tokens already in the context; 1 disables",
           "X", float, True),
    Option("presence_penalty", 0.0, ("--presence-penalty",), "OpenAI presence penalty", "X", float),
    Option("frequency_penalty", 0.0, ("--frequency-penalty",), "OpenAI frequency penalty", "X", float),
    Option("seed", None, ("--seed",), "random seed, for reproducible sampling", "N", int),
    Option("stop", (), ("--stop",), "stop at this string (repeatable)", "TEXT"),
    Option("logprobs", None, (), "report each token's log-probability and the N likeliest alternatives", "N", int),
    Option("ignore_eos", False, ("--ignore-eos",), "keep generating past end-of-sequence tokens (benchmarks)", None,
           "flag"),
)
BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS = {o.name: o.default for o in OPTIONS}
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# OpenAI's and mlx-lm's spelling of max_new_tokens.
ALIASES = {"max_tokens": "max_new_tokens"}


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One request's options, resolved and checked (see resolve)."""
    max_new_tokens: Optional[int]   # None: until the context is full
    sampling: "Any"                 # sampling.SamplingParams
    seed: Optional[int]
    stop: tuple[str, ...]
    logprobs: Optional[int]
    ignore_eos: bool = False


def resolve(generation_config: dict, vocab_size: int, config_path: str = "generation_config.json",
            **given) -> GenerationParams:
    """Each option from `given` when not None, else generation_config.json's value, else the
    default; all checked. A bad value names the option (or the file that set it)."""
    from .sampling import SamplingParams, make_rng

    for alias, name in ALIASES.items():
        if given.get(alias) is not None:
            if given.get(name) is not None:
                raise ValueError(f"give either {name} or its alias {alias}, not both")
            given[name] = given[alias]
        given.pop(alias, None)
    unknown = sorted(set(given) - set(BY_NAME))
    if unknown:
        raise TypeError(f"unknown generation option {unknown[0]!r}; the options are "
                        f"{', '.join(list(BY_NAME) + list(ALIASES))}")
    folder = {o.name: generation_config[o.name] for o in OPTIONS
              if o.from_generation_config and generation_config.get(o.name) is not None}
    if generation_config.get("do_sample") is False:
        folder["temperature"] = 0.0
    value = {o.name: given[o.name] if given.get(o.name) is not None else folder.get(o.name, o.default)
             for o in OPTIONS}
    try:
        n = value["max_new_tokens"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < -1:
            raise ValueError(f"max_new_tokens must be an integer >= 0, or -1 for no limit, got {n!r}")
        sampling = SamplingParams(**{k: value[k] for k in SAMPLING})
    except ValueError as e:
        name = str(e).split()[0]
        if name in folder and given.get(name) is None:  # the bad value is the model folder's
            raise ValueError(f"{config_path}: {e}") from None
        raise
    if value["seed"] is not None:
        make_rng(value["seed"])  # checks it
    lp = value["logprobs"]
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, (int, np.integer)) or not 0 <= lp <= vocab_size):
        raise ValueError(f"logprobs must be None or an integer in [0, vocab_size], got {lp!r}")
    if not isinstance(value["ignore_eos"], bool):
        raise ValueError(f"ignore_eos must be True or False, got {value['ignore_eos']!r}")
    return GenerationParams(None if n == -1 else int(n), sampling, value["seed"], stop_strings(value["stop"]),
                            None if lp is None else int(lp), value["ignore_eos"])


def stop_strings(stop: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stops)

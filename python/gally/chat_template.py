"""Chat templates: the model's Jinja template rendered in a sandbox, with the environment
transformers gives it (trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now,
a tojson that keeps non-ASCII text), so that a conversation renders to the same text in both."""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import time
from typing import Any


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render it."""


# Bounds on one rendering: items of a repeated sequence, numbers range() yields in all, the
# exponent of a power, and its time (checked at every call, attribute and item the template
# reads, so at every step of any loop that does something). A real template loops over the
# messages, writes kilobytes and takes milliseconds.
MAX_ITEMS = 1 << 20
MAX_RANGE_STEPS = 100_000
MAX_EXPONENT = 4096
MAX_SECONDS = 2.0

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("chat_template_deadline", default=float("inf"))


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise ChatTemplateError(f"the chat template ran for more than {MAX_SECONDS:g} s")


class _BoundedRange:
    """range() for one rendering, yielding at most MAX_RANGE_STEPS numbers in all: nested loops
    over large ranges would otherwise run for hours."""

    def __init__(self):
        self.left = MAX_RANGE_STEPS

    def __call__(self, *args):
        _check_time()
        r = range(*args)
        self.left -= len(r)
        if self.left < 0:
            raise ChatTemplateError(f"the chat template's loops over range() go past {MAX_RANGE_STEPS} steps")
        return r


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # {% generation %} marks assistant text for training masks; rendering just keeps its body.
    class _Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class _Bounded(ImmutableSandboxedEnvironment):
        # A template from a downloaded file must not take the process's memory or time: products
        # and powers are checked before they are computed (range is bounded per render, below).
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise ChatTemplateError(f"the chat template raises a number to the power {right}")
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_ITEMS:
                        raise ChatTemplateError(f"the chat template repeats a sequence of {len(seq)} items "
                                                f"{count} times")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            _check_time()
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _check_time()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_time()
            return super().getitem(obj, argument)

    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except (RecursionError, SyntaxError, ValueError, TypeError) as e:  # what Jinja's compiler trips over
        raise ChatTemplateError(f"the chat template is not valid Jinja ({type(e).__name__}: {e})") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
    """The conversation `messages` ([{"role": ..., "content": ...}, ...]) as the template writes it;
    `variables` (bos_token, eos_token, tools, ...) are visible to the template."""
    import jinja2

    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' (and usually 'content'), got {m!r}")
    # Keys whose value is None are dropped, as transformers does: templates test for presence.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    template = compile_template(source)
    variables.setdefault("range", _BoundedRange())
    variables.setdefault("tools", None)  # templates test `tools is not none`, which undefined fails
    variables.setdefault("documents", None)
    token = _deadline.set(time.monotonic() + MAX_SECONDS)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on this conversation: {e}") from None
    except Exception as e:  # the template is a program: its own errors (1/0, "a" - 1, deep recursion)
        raise ChatTemplateError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None
    finally:
        _deadline.reset(token)

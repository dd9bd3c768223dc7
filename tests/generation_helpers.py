"""Helpers for the generation tests: a small byte-level BPE tokenizer with a ChatML template, random
checkpoints that carry it, and a scripted model whose greedy output is a given token sequence."""

from __future__ import annotations

import json
import os

import numpy as np

from conftest import make_checkpoint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# English only, so that emoji and CJK stay split into byte tokens (3-4 tokens a character).
CORPUS = ["The capital of France is Paris. Hello world, hello there! The quick brown fox jumps over the lazy dog.",
          "Stop here. STOP now. Generation ends at a stop string or the end of a turn."] * 20


def build_backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer(folder) -> int:
    """Writes tokenizer.json + tokenizer_config.json (ChatML template); returns the vocabulary size."""
    backend = build_backend()
    backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}, f)
    return backend.get_vocab_size()


def make_text_checkpoint(folder, generation_config=None, **overrides):
    """A random checkpoint with the tokenizer above (vocab 400, eos <|im_end|>)."""
    os.makedirs(folder, exist_ok=True)
    vocab = write_tokenizer(folder)
    overrides = {"vocab_size": vocab, "eos_token_id": 2, "bos_token_id": 1, **overrides}
    make_checkpoint(folder, **overrides)
    if generation_config is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return folder


class ScriptedSession:
    """Session stand-in: after the prompt, the logits make script[i] the argmax at step i
    (+10 over a background of small random logits), then <|endoftext|> when the script runs out."""

    def __init__(self, model, max_context):
        self.model = model
        self.max_context = max_context
        self.position = 0
        self.appended: list[list[int]] = []

    def append(self, ids):
        ids = [int(ids)] if np.ndim(ids) == 0 else [int(i) for i in ids]
        if self.position + len(ids) > self.max_context:
            raise ValueError("past max_context")
        self.appended.append(ids)
        self.position += len(ids)
        m = self.model
        step = self.position - m.prompt_len
        logits = m.rng.standard_normal(m.config.vocab_size).astype(np.float32)
        logits[m.script[step] if step < len(m.script) else 0] += 10.0
        return logits

    def truncate(self, position):
        self.position = position


class ScriptedModel:
    """Model stand-in for the token loop's own logic (stop strings, EOS, streaming): generates
    `script` after a prompt of prompt_len tokens."""

    def __init__(self, tokenizer, script, prompt_len, max_context=512, generation_config=None, padded_vocab=0):
        from gally.config import Config

        self.tokenizer = tokenizer
        self.script = list(script)
        self.prompt_len = prompt_len
        self.max_context = max_context
        self.generation_config = generation_config or {}
        self.path = "<scripted>"
        self.rng = np.random.default_rng(0)
        self.config = Config.from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=8, intermediate_size=8,
                                            num_hidden_layers=1, num_attention_heads=1,
                                            vocab_size=tokenizer.vocab_size + padded_vocab, eos_token_id=0))
        self.sessions: list[ScriptedSession] = []

    def session(self, max_context=None):
        s = ScriptedSession(self, max_context or self.max_context)
        self.sessions.append(s)
        return s

    def runner(self, max_tokens=None):
        return ScriptedRunner(max_tokens or 512)


class ScriptedRunner:
    """Runner stand-in: each session's append, one after another."""

    def __init__(self, max_tokens, gemm_min_tokens=4):
        self.max_tokens = max_tokens
        self.gemm_min_tokens = gemm_min_tokens

    def forward_checked(self, sessions, token_ids, counts):
        starts = np.cumsum([0] + list(counts))
        return np.stack([s.append(token_ids[a:b]) for s, a, b in zip(sessions, starts, starts[1:])])


def gally_tokenizer():
    from gally.tokenizer import Tokenizer

    backend = build_backend()
    eos = [backend.token_to_id("<|im_end|>")]
    return Tokenizer(backend, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, eos, CHATML)

"""The documented tokenizer rule, the chat template and synthetic output text."""
from __future__ import annotations

import pytest

from nodes.tokenizer import (WORDS, count_chat_tokens, count_tokens, render_chat, synthetic_prompt,
                             synthetic_text, synthetic_word, token_text, tokenize)

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


@pytest.mark.parametrize("text, tokens", [
    ("", []),
    ("   \n\t ", []),
    ("hello", ["hell", "o"]),
    ("tokenizer", ["toke", "nize", "r"]),
    ("a bc def ghij", ["a", "bc", "def", "ghij"]),
    ("Hello, world!", ["Hell", "o", ",", "worl", "d", "!"]),
    ("x=1+2", ["x", "=", "1", "+", "2"]),
    ("snake_case_name", ["snak", "e_ca", "se_n", "ame"]),
    ("12345678", ["1234", "5678"]),
    ("héllo wörld", ["héll", "o", "wörl", "d"]),
    ("<|user|>", ["<", "|", "user", "|", ">"]),
])
def test_rule(text, tokens):
    assert tokenize(text) == tokens
    assert count_tokens(text) == len(tokens)


def test_count_matches_tokenize_on_long_text():
    text = "The quick, brown fox; jumps over 1234567 lazy dogs!!! " * 500
    assert count_tokens(text) == len(tokenize(text)) == 500 * 18


def test_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert count_chat_tokens(messages) == 6 + 4 + 5 + 1 + 7
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(parts) == "<|user|>\na\nb\n<|assistant|>\n"
    assert render_chat([{"role": "assistant", "content": None}]) == "<|assistant|>\n\n<|assistant|>\n"
    with pytest.raises(ValueError):
        render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(ValueError):
        render_chat([{"role": "user", "content": 3}])


def test_synthetic_output_is_deterministic_and_one_token_per_word():
    assert len(WORDS) == 256 and len(set(WORDS)) == 256
    words = [synthetic_word("r000001", i) for i in range(1000)]
    assert words == [synthetic_word("r000001", i) for i in range(1000)]
    assert words != [synthetic_word("r000002", i) for i in range(1000)]
    assert len(set(words)) > 100  # spread over the vocabulary
    assert all(count_tokens(token_text("r000001", i)) == 1 for i in range(1000))
    assert token_text("r", 0) == synthetic_word("r", 0) and token_text("r", 1) == " " + synthetic_word("r", 1)
    for n in (1, 2, 17, 500):
        text = synthetic_text("req-x", n)
        assert count_tokens(text) == n and len(text.split(" ")) == n
    assert count_tokens(synthetic_prompt(1234)) == 1234


def test_stable_across_processes():
    """Fixed values: blake2b, not Python's randomised hash(), picks the words."""
    import subprocess
    import sys
    code = "from nodes.tokenizer import synthetic_text; print(synthetic_text('abc', 8))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert outs == {synthetic_text("abc", 8) + "\n"}

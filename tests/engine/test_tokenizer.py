"""Tokenizers: the GGUF-built tokenizer equals transformers' on the same file, and none of it needs torch."""

from __future__ import annotations

import subprocess
import sys

from ponder.engine.model_store import resolve_model
from ponder.engine.tokenizer import Tokenizer
from tests.references import reference_dir

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "请用中文介绍一下你自己。",
    "emoji 🌊🐟 and accents: café, naïve, Ærø",
    "code: def f(x):\n\treturn x**2  # comment\n",
    "numbers 1234567890 3.14159 1e-10",
    "<|im_start|>user\nhi<|im_end|>\n",
    "Ελληνικά, русский, العربية, 日本語",
]


def test_gguf_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    ours = Tokenizer.from_pretrained(resolve_model("smollm2-135m"))
    theirs = AutoTokenizer.from_pretrained(reference_dir("smollm2-135m"))  # transformers' conversion of the GGUF
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == [theirs.convert_tokens_to_ids("<|im_end|>")]
    assert ours.chat_template == theirs.chat_template


def test_hf_directory_tokenizer_round_trips():
    ours = Tokenizer.from_pretrained(resolve_model("tiny-llama"))
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert ours.encode("x")[0] == ours.bos_token_id  # Llama-style: BOS first
    assert ours.encode("<think>", add_special_tokens=False) == [ours.token_to_id("<think>")]


def test_the_tokenizer_runs_without_torch():
    """What the API process does with a tokenizer (load it from the GGUF, render a chat) loads no
    torch. That importing the torch-free part of the engine loads none: tests/test_layout.py."""
    code = (
        "import sys\n"
        "from ponder.engine.model_store import resolve_model\n"
        "from ponder.engine.tokenizer import Tokenizer\n"
        "t = Tokenizer.from_pretrained(resolve_model('smollm2-135m'))\n"
        "t.encode_chat([{'role': 'user', 'content': 'hi'}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

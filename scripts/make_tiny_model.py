"""Build a tiny randomly initialised Llama model with its own BPE tokenizer, offline.

Usage::

    python scripts/make_tiny_model.py OUT_DIR [--text FILE ...] [--vocab-size 2048] [--seed 0]

``OUT_DIR`` receives a Hugging Face model directory that vLLM (``--model OUT_DIR``) and
``transformers`` load without any download: ``config.json`` and the weights
(``save_pretrained``), ``tokenizer.json`` (usable on its own, e.g. as ``isthmus serve``'s
``tokenizer``), ``tokenizer_config.json``, a chat template and ``generation_config.json``. The
chat template renders a conversation as :func:`isthmus.core.tokenizer.render_chat` does (each
message as ``<|ROLE|>``, newline, content, newline; then ``<|assistant|>`` and a newline), so the
router and vLLM tokenize a chat prompt alike.

The model: ``LlamaConfig`` with 2 layers, hidden size 128, 4 attention heads of dimension 32,
4 key/value heads, an MLP of 256, 2,048 positions, random weights from ``--seed``. The
tokenizer: a byte-level BPE trained with the ``tokenizers`` library on local text (by default the
repository's ``README.md`` and ``docs/*.md``), ``--vocab-size`` tokens including the specials
``<unk>``, ``<s>``, ``</s>``, ``<pad>``. It adds no special token when encoding, so the
``tokenizer.json`` alone and the full tokenizer give the same ids for a prompt.

Needs ``torch``, ``transformers`` and ``tokenizers`` (the vLLM virtualenv has all three). Takes a
few seconds and writes about 2 MB. Exits non-zero with a message when no training text is found.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_texts() -> list[Path]:
    """The repository's README and docs, the default training text."""
    return [p for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if p.is_file()]


def _lines(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        yield from f.read_text(encoding="utf-8", errors="replace").splitlines()


def train_tokenizer(files: Sequence[Path], vocab_size: int) -> object:
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` tokens trained on ``files``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_lines(files), trainer=trainer)
    return tok


def build(out: Path, files: Sequence[Path], vocab_size: int = 2048, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to ``out`` (created if needed); return ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    raw = train_tokenizer(files, vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write the model to")
    parser.add_argument("--text", type=Path, action="append", default=None,
                        help="training text for the tokenizer (repeatable; default: README.md and docs/*.md)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = args.text if args.text else default_texts()
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        print(f"no training text: {', '.join(missing) or 'README.md and docs/*.md not found'}", file=sys.stderr)
        return 2
    out = build(args.out, files, args.vocab_size, args.seed)
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    print(f"tiny model written to {out} (vocab {vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

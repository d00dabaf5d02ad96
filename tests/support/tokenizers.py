"""Tokenizers built in the test itself (nothing is downloaded)."""
from __future__ import annotations

import os
import random

SP_WORDS = ("the quick brown fox jumps over lazy dog hello world user assistant chat system code python def "
            "return answer question vicuna model token data train").split()


def train_sentencepiece(folder, vocab_size: int = 400) -> str:
    """Train a tiny Llama-style sentencepiece BPE model into `folder`/tokenizer.model."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(SP_WORDS) for _ in range(12)) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2)
    return str(folder)

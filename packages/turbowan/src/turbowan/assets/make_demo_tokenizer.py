"""Train the tiny SentencePiece model used by the embedded demo (`demo_spiece.model`).

Run once; the output is committed. The corpus is generated here from short word lists, so the
model is reproducible without any download. It uses umT5's id layout (pad 0, EOS 1, unk 2, no
BOS) and at most 512 pieces, so its ids fit the `umt5-tiny` encoder's vocabulary.

    python packages/turbowan/src/turbowan/assets/make_demo_tokenizer.py [OUT]
"""

from __future__ import annotations

import io
import itertools
import random
import sys
from pathlib import Path

SUBJECTS = [
    "a red fox", "an old fisherman", "a small robot", "two dancers", "a white horse",
    "a paper boat", "the city skyline", "a hummingbird", "a steam train", "a lighthouse keeper",
    "a golden retriever", "snowflakes", "a hot air balloon", "a street musician", "an astronaut",
]
ACTIONS = [
    "walks slowly through", "drifts across", "turns to look at", "runs along", "glides over",
    "waits quietly beside", "jumps into", "spins around in", "rises above", "disappears into",
]
PLACES = [
    "a misty forest", "the calm sea at dawn", "a busy market street", "a frozen lake",
    "a field of sunflowers", "the desert at sunset", "a rainy neon alley", "a mountain village",
    "an empty train station", "a coral reef",
]
STYLES = [
    "cinematic lighting", "soft focus", "slow motion", "handheld camera", "wide angle shot",
    "golden hour", "high detail", "gentle camera pan", "dramatic shadows", "vivid colors",
]


# everyday words, so the pieces cover more than the sentence templates above
WORDS = (
    "light dark water fire stone wind cloud rain snow river ocean island bridge tower castle "
    "garden kitchen window door table chair lamp candle mirror clock book letter flower tree "
    "leaf branch root grass sand dust smoke glass metal wood silk paper gold silver copper "
    "morning evening night summer winter spring autumn storm thunder lightning rainbow shadow "
    "child woman man girl boy friend family crowd soldier dancer painter farmer sailor pilot "
    "cat dog bird fish horse whale tiger rabbit dragon butterfly owl wolf bear deer eagle "
    "red orange yellow green blue purple pink brown black white grey bright pale deep warm cold "
    "quick slow quiet loud gentle strong tiny huge ancient modern empty crowded smooth rough "
    "walking running flying swimming falling dancing singing laughing smiling crying sleeping "
    "looking holding opening closing reaching turning floating shining burning melting growing "
    "camera zoom pan tilt close up portrait landscape frame scene shot video film motion blur "
    "realistic painting sketch anime watercolor photograph render detailed sharp grain noise "
    "one two three four five six seven eight nine ten hundred thousand first last next "
    "and or but with without under over between behind before after while during through "
    "the a an of in on at to from by for is are was were has have it its this that these those"
).split()
# every printable ASCII character appears at least once, so few ids are <unk>
CHARSET = "".join(chr(c) for c in range(33, 127))


def corpus() -> list[str]:
    """Deterministic prompt-like sentences built from the lists above."""
    lines = []
    for i, (s, a, p) in enumerate(itertools.product(SUBJECTS, ACTIONS, PLACES)):
        style = STYLES[i % len(STYLES)]
        lines.append(f"{s.capitalize()} {a} {p}, {style}.")
    rng = random.Random(0)
    for _ in range(1500):
        words = rng.sample(WORDS, rng.randint(5, 14))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";", ":"]))
    lines.extend(CHARSET[i : i + 10] for i in range(0, len(CHARSET), 10))
    lines.append(CHARSET)
    return lines


def train(vocab_size: int = 512) -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        normalization_rule_name="identity",  # keeps the file tiny (no NFKC table)
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).with_name("demo_spiece.model")
    data = train()
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

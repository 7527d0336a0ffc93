"""From text to token ids: the basic_english tokenizer, a word vocabulary, subword tokenizers.

torchtext gave generations of tutorials `get_tokenizer("basic_english")` and
`build_vocab_from_iterator`; torchtext is archived and no longer imports with current torch, so
this module re-creates what it offered. Subword tokenizers (BPE, WordPiece) are trained with
Hugging Face `tokenizers`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD = "<pad>"
UNK = "<unk>"

# torchtext's basic_english rules, applied in this order after lower-casing. The order matters:
# quotes are split off before anything else and "<br />" is removed after periods were split
# (it holds no period, so it survives that rule intact).
_BASIC_ENGLISH_RULES = [
    (re.compile(r"\'"), " '  "),
    (re.compile(r"\""), ""),
    (re.compile(r"\."), " . "),
    (re.compile(r"<br \/>"), " "),
    (re.compile(r","), " , "),
    (re.compile(r"\("), " ( "),
    (re.compile(r"\)"), " ) "),
    (re.compile(r"\!"), " ! "),
    (re.compile(r"\?"), " ? "),
    (re.compile(r"\;"), " "),
    (re.compile(r"\:"), " "),
    (re.compile(r"\s+"), " "),
]


def basic_english(text: str) -> list[str]:
    """Split `text` into lower-cased words and punctuation, exactly as torchtext's basic_english.

    Periods, commas, parentheses, "!" and "?" become tokens; double quotes, ";", ":" and the
    IMDB line break "<br />" are dropped; an apostrophe becomes its own token ("don't" ->
    "don", "'", "t").
    """
    if not isinstance(text, str):
        raise TypeError(f"basic_english expects a str, got {type(text).__name__}")
    text = text.lower()
    for pattern, replacement in _BASIC_ENGLISH_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


class Vocab:
    """A bijection between tokens and ids, with an optional id for unknown tokens.

    Args:
        itos: the tokens, position i holding the token of id i ("index to string").
        default_index: id returned for tokens not in the vocabulary (usually that of "<unk>");
            None makes an unknown token a KeyError.
    """

    def __init__(self, itos: Sequence[str], default_index: int | None = None):
        itos = list(itos)
        for i, token in enumerate(itos):
            if not isinstance(token, str):
                raise TypeError(f"vocabulary entry {i} is {type(token).__name__}, expected str")
        self._itos = itos
        self._stoi = {token: i for i, token in enumerate(itos)}
        if len(self._stoi) != len(itos):
            duplicates = sorted(token for token, n in Counter(itos).items() if n > 1)
            raise ValueError(f"vocabulary has duplicate tokens: {duplicates[:10]}")
        self._default_index = None
        self.set_default_index(default_index)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: str) -> bool:
        return token in self._stoi

    def __getitem__(self, token: str) -> int:
        index = self._stoi.get(token, self._default_index)
        if index is None:
            raise KeyError(f"token {token!r} is not in the vocabulary and no default index is set")
        return index

    def __call__(self, tokens: Iterable[str]) -> list[int]:
        return self.lookup_indices(tokens)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, default_index={self._default_index})"

    def lookup_indices(self, tokens: Iterable[str]) -> list[int]:
        return [self[token] for token in tokens]

    def lookup_token(self, index: int) -> str:
        if not 0 <= index < len(self._itos):
            raise IndexError(f"index {index} is out of range for {len(self)} tokens")
        return self._itos[index]

    def lookup_tokens(self, indices: Iterable[int]) -> list[str]:
        return [self.lookup_token(index) for index in indices]

    def get_itos(self) -> list[str]:
        return list(self._itos)

    def get_stoi(self) -> dict[str, int]:
        return dict(self._stoi)

    def set_default_index(self, index: int | None) -> None:
        if index is not None and not 0 <= index < len(self._itos):
            raise ValueError(f"default index {index} is out of range for {len(self)} tokens")
        self._default_index = index

    def get_default_index(self) -> int | None:
        return self._default_index

    def encode(self, text: str, tokenizer: Callable[[str], list[str]] = basic_english) -> list[int]:
        """Tokenize `text` and map each token to its id."""
        return self.lookup_indices(tokenizer(text))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON: {"itos": [...], "default_index": ...}."""
        data = {"itos": self._itos, "default_index": self._default_index}
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary written by `save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a JSON vocabulary file: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list):
            raise ValueError(f'{path} does not hold a vocabulary: expected {{"itos": [...], ...}}')
        return cls(data["itos"], data.get("default_index"))


def build_vocab(
    texts: Iterable[str | Sequence[str]],
    min_freq: int = 1,
    max_size: int | None = None,
    specials: Sequence[str] = (PAD, UNK),
    tokenizer: Callable[[str], list[str]] = basic_english,
) -> Vocab:
    """Build a word vocabulary: specials first, then words by frequency, ties by first appearance.

    torchtext broke frequency ties alphabetically; first appearance keeps the order of the
    corpus, which is just as deterministic and easier to predict by reading the text.

    Args:
        texts: strings (tokenized with `tokenizer`) or already-tokenized lists of strings.
        min_freq: a word needs at least this many occurrences to get an id.
        max_size: the largest vocabulary, specials included; the rarest words are left out.
        specials: tokens placed first, in this order; "<unk>" among them becomes the default id.
        tokenizer: turns a string into tokens.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings, not a single string")
    if min_freq < 1:
        raise ValueError(f"min_freq must be at least 1, got {min_freq}")
    if max_size is not None and max_size < len(specials):
        raise ValueError(f"max_size={max_size} cannot hold the {len(specials)} special tokens")

    counts: Counter[str] = Counter()  # insertion order = order of first appearance
    n_texts = 0
    for i, item in enumerate(texts):
        if isinstance(item, str):
            tokens = tokenizer(item)
        elif isinstance(item, (list, tuple)) and all(isinstance(t, str) for t in item):
            tokens = item
        else:
            raise TypeError(
                f"text {i} is {type(item).__name__}; expected a str or a list of str tokens"
            )
        counts.update(tokens)
        n_texts += 1
    if n_texts == 0:
        raise ValueError("build_vocab got no texts: the iterable is empty")

    for special in specials:
        counts.pop(special, None)  # a special keeps its reserved id, never a second one
    words = [word for word, n in counts.items() if n >= min_freq]
    words.sort(key=lambda word: -counts[word])  # stable sort: ties stay in first-appearance order
    if max_size is not None:
        words = words[: max_size - len(specials)]

    default_index = list(specials).index(UNK) if UNK in specials else None
    return Vocab([*specials, *words], default_index)


TOKENIZER_KINDS = ("bpe", "wordpiece", "byte_bpe")
BYTE_BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")  # the end of a document (GPT-2's name) and padding


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    specials: Sequence[str] | None = None,
) -> tokenizers.Tokenizer:
    """Train a subword tokenizer on `texts` with Hugging Face `tokenizers`.

    "bpe": byte-pair encoding, merge the most frequent adjacent pair until `vocab_size`
    (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909). "wordpiece": merge the pair that
    most raises the corpus likelihood, count(ab) / (count(a) count(b)); continuation pieces
    start with "##" (Schuster & Nakajima 2012; BERT). For both, text is lower-cased and split on
    whitespace and punctuation first. "byte_bpe": BPE over the UTF-8 bytes of the text, as GPT-2
    (Radford et al. 2019): nothing is lower-cased or unknown, every string round-trips exactly, and
    a word keeps its leading space ("Ġthe"): the tokenizer of a causal LM.

    Specials take ids 0, 1, ... in order (default: [PAD] [UNK] [CLS] [SEP] [MASK], and for byte_bpe
    <|endoftext|> <|pad|>); if "[PAD]" is among them, `encode_batch` pads with it.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    if specials is None:
        specials = BYTE_BPE_SPECIALS if kind == "byte_bpe" else ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer got no texts: the iterable is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, expected str")
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size={vocab_size} leaves no room after {len(specials)} specials")
    unk = "[UNK]" if "[UNK]" in specials else None
    options = dict(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials),
        show_progress=False,
    )

    if kind == "byte_bpe":
        tokenizer = tokenizers.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **options)
        tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return tokenizer
    if kind == "bpe":
        # The end-of-word marker lets decode() glue pieces back into words.
        tokenizer = tokenizers.Tokenizer(models.BPE(unk_token=unk, end_of_word_suffix="</w>"))
        tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
        trainer = trainers.BpeTrainer(end_of_word_suffix="</w>", **options)
    else:
        if unk is None:
            raise ValueError("a wordpiece tokenizer needs '[UNK]' among the specials")
        tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token=unk))
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(**options)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if kind == "wordpiece":
        # The trainer finds the same pieces every time but may number them differently from one training
        # to the next (a hash-map order): specials first, then the pieces in sorted order, fixes the ids.
        # (When the last merges tie, another of the tied pieces may be chosen: a piece or two can differ.)
        vocab = tokenizer.get_vocab()
        order = list(specials) + sorted(piece for piece in vocab if piece not in specials)
        tokenizer.model = models.WordPiece({piece: i for i, piece in enumerate(order)}, unk_token=unk)
    if "[PAD]" in specials:
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer

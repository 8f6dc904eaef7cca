"""TextCorpus: the token ids of one text corpus (train, val, test) with its vocabulary."""
import dataclasses

import torch


@dataclasses.dataclass(repr=False)
class TextCorpus:
    """Token ids of one corpus: train, val, test are 1-D torch.long tensors indexing vocab.

    level "char": one token per character; level "word": whitespace-separated words (WikiText marks rare words
    as "<unk>" and each line ends with "<eos>").
    """

    name: str
    level: str
    vocab: list
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def __post_init__(self):
        self.index = {token: i for i, token in enumerate(self.vocab)}

    @property
    def vocab_size(self):
        return len(self.vocab)

    def __repr__(self):
        return (f"TextCorpus({self.name!r}, {self.level} level, vocab {self.vocab_size:,}, train {len(self.train):,} "
                f"/ val {len(self.val):,} / test {len(self.test):,} tokens)")

    def encode(self, text):
        """text -> 1-D LongTensor of ids; at word level, unknown words become "<unk>"."""
        if self.level == "char":
            unknown = sorted(set(text) - self.index.keys())
            if unknown:
                raise ValueError(f"text has characters outside the {self.name} vocabulary: {unknown!r}")
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        unk = self.index.get("<unk>")
        return torch.tensor([self.index.get(word, unk) for word in text.split()], dtype=torch.long)

    def decode(self, ids):
        """ids (any iterable of ints, or a tensor) -> text."""
        tokens = [self.vocab[i] for i in torch.as_tensor(ids).flatten().tolist()]
        return ("" if self.level == "char" else " ").join(tokens)

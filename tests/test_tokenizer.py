"""Tokenizers vs transformers (the tokenizers the diffusers pipelines use), built from the shipped files.

CLIP: transformers 5 has only the `tokenizers`-backed CLIPTokenizer (no Python "slow" one), so the
second reference is the textbook BPE loop written out below (lowest-rank pair first, as OpenAI's
SimpleTokenizer does, with transformers' normalisation), reading the same merges.txt. BERT: transformers' BertTokenizer (fast)
and BertTokenizerLegacy (the pure-Python one). Pinned ids from the official vocabulary check that
the regenerated files are the real ones, not just self-consistent.
"""
import json
import os
import shutil
import unicodedata

import regex
import torch

from conftest import BERT_VOCAB, CLIP_VOCAB

from transformers import BertTokenizer as HFBert
from transformers import BertTokenizerLegacy as HFBertSlow
from transformers import CLIPTokenizer as HFCLIP

from minisd.config import CLIPTextConfig, LDMBertConfig
from minisd.tokenizer import BertTokenizer, CLIPTokenizer, load_tokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF A CAT, Highly Detailed; 8k!!!",
    "",
    "   leading, trailing and   many    spaces   ",
    "tabs\tand\nnew\r\nlines",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "punctuation: (parens) [brackets] {braces} <angles> \"quotes\" 'single' -- dashes... ?!",
    "contractions: it's, don't, we're, they've, I'm, you'll, he'd",
    "unicode: café naïve façade Ångström über straße",
    "CJK 東京 の 夜景, emoji 😀🎨🚀, arabic مرحبا, cyrillic Привет",
    "combining e\u0301 vs \u00e9 (NFC)",
    "hello! wow!! what?!",
    "special tokens in text: <|startoftext|> and <|endoftext|> and [CLS] [SEP] [MASK]",
    "supercalifragilisticexpialidocious " * 3,
    "a very long prompt " * 40,                 # > 77 tokens: truncated, EOS / [SEP] kept
    "masterpiece, best quality, (ultra-detailed:1.2), 1girl, solo, looking_at_viewer",
    "x" * 300,                                  # one enormous word
    "&amp; &lt;b&gt; html entities",
]


def ids(hf, prompts):
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same(ours, ref, prompts):
    assert ours.shape == ref.shape == (len(prompts), 77), (ours.shape, ref.shape)
    for i, p in enumerate(prompts):
        assert torch.equal(ours[i], ref[i]), f"{p!r}:\n ours {ours[i].tolist()}\n ref  {ref[i].tolist()}"


def hf_clip(pad):
    return HFCLIP(vocab=os.path.join(CLIP_VOCAB, "vocab.json"), merges=os.path.join(CLIP_VOCAB, "merges.txt"),
                  pad_token=pad)


# ---------------------------------------------------------------------------------------------
# Independent reference: textbook BPE (lowest-rank pair first) with the same normalisation.
# ---------------------------------------------------------------------------------------------
class ReferenceBPE:
    PAT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                        r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")

    def __init__(self, pad):
        with open(os.path.join(CLIP_VOCAB, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(os.path.join(CLIP_VOCAB, "merges.txt"), encoding="utf-8") as f:
            merges = [tuple(l.split()) for l in f.read().split("\n")[1:] if l]
        self.ranks = {m: i for i, m in enumerate(merges)}
        keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        rest = [b for b in range(256) if b not in keep]
        self.byte = {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}
        self.specials = {"<|startoftext|>", "<|endoftext|>", pad}
        self.pad_id = self.vocab[pad]

    def bpe(self, word):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0          # merge every occurrence of the pair, left to right
            while j < len(parts):
                if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return parts

    def encode_piece(self, text):
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
        out = []
        for w in self.PAT.findall(text):
            out += [self.vocab[t] for t in self.bpe("".join(self.byte[b] for b in w.encode("utf-8")))]
        return out

    def __call__(self, prompts):
        rows = []
        for p in prompts:
            # Special tokens are matched in the raw text first, as added tokens are.
            pattern = "(" + "|".join(regex.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")"
            toks = []
            for piece in regex.split(pattern, p):
                toks += [self.vocab[piece]] if piece in self.specials else self.encode_piece(piece)
            toks = [49406] + toks[:75] + [49407]
            rows.append(toks + [self.pad_id] * (77 - len(toks)))
        return torch.tensor(rows)


def test_clip_vocab_files_are_the_official_ones():
    with open(os.path.join(CLIP_VOCAB, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(CLIP_VOCAB, "merges.txt"), encoding="utf-8") as f:
        merges = f.read().split("\n")
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    # Ids of the official openai/clip-vit-large-patch14 vocabulary.
    official = {"!": 0, '"': 1, "!</w>": 256, "!!": 1443, "a</w>": 320, "photo</w>": 1125, "of</w>": 539,
                "cat</w>": 2368, "aaron</w>": 7709, "ľë": 39810, "ŁãģĦ</w>": 46023, "<|startoftext|>": 49406,
                "<|endoftext|>": 49407}
    assert {k: vocab[k] for k in official} == official
    assert os.path.getsize(os.path.join(CLIP_VOCAB, "vocab.json")) == 1_059_961
    assert os.path.getsize(os.path.join(CLIP_VOCAB, "merges.txt")) == 524_618
    assert CLIPTokenizer()(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bert_vocab_file():
    with open(os.path.join(BERT_VOCAB, "vocab.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert len(lines) == 30522 + 1 and lines[-1] == ""
    assert [lines[i] for i in (0, 100, 101, 102, 103, 1037, 4937)] == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]


def test_clip_sd1_padding_matches_transformers():
    pad = "<|endoftext|>"
    ours = CLIPTokenizer(pad_token=pad)(PROMPTS)
    assert_same(ours, ids(hf_clip(pad), PROMPTS), PROMPTS)
    assert_same(ours, ReferenceBPE(pad)(PROMPTS), PROMPTS)
    assert (ours[2, :2] == torch.tensor([49406, 49407])).all() and (ours[2, 2:] == 49407).all()  # ""
    assert ours[14, -1] == 49407                                             # truncated, EOS kept


def test_clip_openclip_padding_matches_transformers():
    pad = "!"
    ours = CLIPTokenizer(pad_token=pad)(PROMPTS)
    assert_same(ours, ids(hf_clip(pad), PROMPTS), PROMPTS)
    assert_same(ours, ReferenceBPE(pad)(PROMPTS), PROMPTS)
    assert ours[2, 2:].eq(0).all() and ours[14, -1] == 49407
    # The "!" pad token is matched inside prompts too (transformers' behaviour): "hello!" ends in 0.
    assert CLIPTokenizer(pad_token="!")(["hello!"])[0, :4].tolist() == [49406, 3306, 0, 49407]
    assert CLIPTokenizer()(["hello!"])[0, :4].tolist() == [49406, 3306, 256, 49407]


def test_bert_matches_transformers_fast_and_slow():
    ours = BertTokenizer()(PROMPTS)
    assert_same(ours, ids(HFBert.from_pretrained(BERT_VOCAB), PROMPTS), PROMPTS)
    assert_same(ours, ids(HFBertSlow(os.path.join(BERT_VOCAB, "vocab.txt")), PROMPTS), PROMPTS)
    assert ours[14, -1] == 102 and ours[2, :3].tolist() == [101, 102, 0]


def test_single_string_and_load_tokenizer():
    tok = load_tokenizer(CLIPTextConfig(pad_token="!"))
    assert isinstance(tok, CLIPTokenizer) and tok.pad_id == 0
    assert torch.equal(tok("a cat"), tok(["a cat"]))
    assert tok(["a cat"]).dtype == torch.long
    bert = load_tokenizer(LDMBertConfig())
    assert isinstance(bert, BertTokenizer) and bert(["a cat"]).shape == (1, 77)


def test_save_and_own_vocab_dirs(tmp_path):
    """`save` writes a folder transformers loads with the right padding length; a model's own files
    (vocab.json + merges.txt, transformers 5's tokenizer.json only, vocab.txt) load back."""
    for pad in ("<|endoftext|>", "!"):
        ours = CLIPTokenizer(pad_token=pad)
        ours.save(tmp_path / f"clip{len(pad)}")
        hf = HFCLIP.from_pretrained(tmp_path / f"clip{len(pad)}")
        assert hf.model_max_length == 77 and hf.pad_token == pad
        ref = hf(PROMPTS, padding="max_length", max_length=hf.model_max_length, truncation=True,
                 return_tensors="pt").input_ids
        assert_same(ours(PROMPTS), ref, PROMPTS)
        for name in ("vocab.json", "merges.txt"):   # byte-identical to the shipped (= hub) files
            with open(tmp_path / f"clip{len(pad)}" / name, "rb") as a, open(os.path.join(CLIP_VOCAB, name), "rb") as b:
                assert a.read() == b.read()
        # transformers 5 saves only tokenizer.json
        hf.save_pretrained(tmp_path / f"hf{len(pad)}")
        only = tmp_path / f"only{len(pad)}"
        only.mkdir()
        shutil.copy(tmp_path / f"hf{len(pad)}" / "tokenizer.json", only / "tokenizer.json")
        assert_same(CLIPTokenizer(str(only), pad_token=pad)(PROMPTS), ref, PROMPTS)
        assert_same(CLIPTokenizer(str(tmp_path / f"clip{len(pad)}"), pad_token=pad)(PROMPTS), ref, PROMPTS)

    bert = BertTokenizer()
    bert.save(tmp_path / "bert")
    hf = HFBert.from_pretrained(tmp_path / "bert")
    assert hf.model_max_length == 77
    ref = ids(hf, PROMPTS)
    assert_same(bert(PROMPTS), ref, PROMPTS)
    with open(tmp_path / "bert" / "vocab.txt", "rb") as a, open(os.path.join(BERT_VOCAB, "vocab.txt"), "rb") as b:
        assert a.read() == b.read()
    hf.save_pretrained(tmp_path / "hfbert")
    (tmp_path / "onlybert").mkdir()
    shutil.copy(tmp_path / "hfbert" / "tokenizer.json", tmp_path / "onlybert" / "tokenizer.json")
    assert_same(BertTokenizer(str(tmp_path / "onlybert"))(PROMPTS), ref, PROMPTS)
    assert_same(load_tokenizer(LDMBertConfig(), vocab_dir=str(tmp_path / "bert"))(PROMPTS), ref, PROMPTS)

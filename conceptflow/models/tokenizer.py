"""The real CLIP BPE vocabulary, offline.

open-clip-torch ships ``bpe_simple_vocab_16e6.txt.gz``; converting it to ``vocab.json`` +
``merges.txt`` gives a ``CLIPTokenizer`` whose ids equal open_clip's (and SD 1.x's), so the
embedded tiny base tokenises prompts exactly as a real Stable Diffusion does.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from conceptflow.errors import ModelUnavailableError

MERGE_COUNT = 49152 - 256 - 2  # open_clip keeps the first 48,894 merges of the file
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


def open_clip_bpe_path() -> Path:
    """Path of the BPE merges file inside the installed open_clip package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("open-clip-torch is not installed; it ships the CLIP BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing from the open-clip-torch install; reinstall it")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the CLIP BPE) into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : MERGE_COUNT + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    vocab_tokens += ["".join(merge.split()) for merge in merges]
    vocab_tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(folder: Path, model_max_length: int = 77) -> "CLIPTokenizer":
    """A CLIPTokenizer over the real CLIP vocabulary, saved in ``folder`` (HF format)."""
    from transformers import CLIPTokenizer  # transformers takes seconds to import: only when one is built

    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=model_max_length,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        pad_token=END_TOKEN,
        unk_token=END_TOKEN,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer

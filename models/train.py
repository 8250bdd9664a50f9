"""Trains the default (fast) ACGE model and exports it with the model contract.

    python models/train.py --out models/acge-default [--seed 7]

Seeded end to end. The examples are hand-written requests and responses for the seven
services (models/data/*.jsonl: violations of each of the six principles of
config/constitution.yaml said plainly and mildly, compliant hard negatives that use
the same words, requests whose label turns on the caller's role, routine traffic) plus
responses generated here. 15 % of the written examples are held out by example, before
any augmentation, as the validation split; the rest are augmented (service swapped,
fields added and renamed, the constitution and content type headers varied, a
violation buried in the note of a compliant body) into the training set. The
independent test sets (models/eval/) are never read here.

The model takes the `hashed` input (docs/model-contract.md): the proxy computes, in
Rust, the bucket ids of character 3-, 4- and 5-grams, words and word pairs of the cut
rendering; models/acge_input.py computes the same ids here. The module is one sum bag
over those ids (10 averaged columns: what the input is about; 6 summed: evidence per
principle, not diluted by a long harmless body), an MLP and one sigmoid per principle.

Writes:
  OUT/model.pt, OUT/model.json            TorchScript fp32 and its metadata
  OUT-int8/model.pt, OUT-int8/model.json  the same, the table and the Linear layers int8
  OUT/fixtures.json                       cases, renderings, ids and outputs for the
                                          Rust parity test
  OUT/heldout.jsonl                       the validation split (held-out written examples)
"""
import argparse
import copy
import glob
import json
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acge_input  # noqa: E402

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
    if c["label"] == "violate" and r < 0.15 and pool_comply and "status" not in c and not c.get("headers"):
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
    # Who asks stays as written (a role can decide the label); the constitution and the
    # content type come and go.
    headers = {k: v for k, v in c.get("headers", {}).items() if k not in ("x-constitutional-hash", "content-type")}
    if rng.random() < 0.6:
        headers["x-constitutional-hash"] = HASH
    if rng.random() < 0.5:
        headers["content-type"] = "application/json"
    c["headers"] = headers
    return c


# Headers a service may echo back in its answer (a debugging envelope, a gateway's
# trace): they say nothing about compliance.
ECHOED_HEADERS = {
    "host": lambda r: f"127.0.0.1:{r.randint(1024, 65535)}",
    "user-agent": lambda r: r.choice(["curl/7.88.1", "python-requests/2.32", "okhttp/4.12", "Go-http-client/1.1"]),
    "accept": lambda r: r.choice(["*/*", "application/json"]),
    "x-user-id": lambda r: f"user-{r.randint(1, 9999)}",
    "x-request-id": lambda r: "%032x" % r.getrandbits(128),
    "x-forwarded-for": lambda r: f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
    "content-type": lambda r: "application/json",
    "content-length": lambda r: str(r.randint(2, 4000)),
    "traceparent": lambda r: "00-%032x-%016x-01" % (r.getrandbits(128), r.getrandbits(64)),
}


def envelope(rng, result):
    """A service's answer wrapped as many services answer: what was asked, what was
    received, the result."""
    service = rng.choice(list(SERVICES))
    echoed = {k: ECHOED_HEADERS[k](rng) for k in rng.sample(list(ECHOED_HEADERS), rng.randint(1, len(ECHOED_HEADERS)))}
    return {
        "service": service,
        "backend": rng.choice(["blue", "green"]),
        "method": rng.choice(["GET", "POST", "POST", "PUT"]),
        "path": rng.choice([SERVICES[service], "/svc", "/healthz", "/api/v1/items"]),
        "received_headers": echoed,
        "body_bytes": rng.randint(0, 4000),
        "result": result,
    }


def response_case(rng):
    leak = rng.random() < 0.2
    body = copy.deepcopy(rng.choice(RESPONSE_LEAK if leak else RESPONSE_OK))
    for k in rng.sample(list(NEUTRAL_FIELDS), rng.randint(0, 2)):
        body.setdefault(k, NEUTRAL_FIELDS[k](rng))
    if rng.random() < 0.5:
        body = envelope(rng, body)
    headers = {"content-type": "application/json"} if rng.random() < 0.7 else {}
    if rng.random() < 0.6:
        headers["x-constitutional-hash"] = HASH
    c = {"status": rng.choice([200, 200, 200, 201, 400, 403]), "headers": headers, "body": body, "label": "violate" if leak else "comply"}
    if leak:
        c["principle"] = "privacy"
    return c




def constitution():
    """The principle ids (in order) and the hash of config/constitution.yaml."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "config", "constitution.yaml")).read()
    return re.findall(r"^\s*-\s*id:\s*(\S+)", text, re.M), re.search(r"^hash:\s*(\S+)", text, re.M).group(1)


def split(rng, directory, variants):
    """(heldout, train_written, cases): the written examples shuffled by `rng`, 15 % of
    them held out before any augmentation (the validation split), and the training
    cases: the rest, `variants` augmented copies of each (consecutive, after all the
    written ones) and generated responses, a tenth as many. Every training script
    calls it first with a fresh generator of the same seed, so all hold out the same
    examples."""
    written = load_written(directory)
    rng.shuffle(written)
    cut = len(written) * 15 // 100
    heldout, train_written = written[:cut], written[cut:]
    comply_pool = [c for c in train_written if c["label"] == "comply" and "status" not in c]
    cases = list(train_written)
    for c in train_written:
        cases.extend(augment(rng, c, comply_pool) for _ in range(variants))
    cases.extend(response_case(rng) for _ in range(len(cases) // 10))
    return heldout, train_written, cases


def target(principles, c):
    t = [0.0] * len(principles)
    if c["label"] == "violate":
        t[principles.index(c["principle"])] = 1.0
    return t


class Fast(nn.Module):
    """One sum bag over the hashed feature ids; an MLP; one sigmoid per principle."""

    def __init__(self, principles: int, buckets: int, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.bag = nn.EmbeddingBag(buckets, dim + principles, mode="sum")
        with torch.no_grad():
            self.bag.weight[:, :dim].normal_(0.0, 0.1)
            self.bag.weight[:, dim:] = 0.0
        self.mlp = nn.Sequential(nn.Linear(dim + principles, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, principles))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.score(self.bag(ids, offsets), ids, offsets)

    @torch.jit.export
    def score(self, bag: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        end = torch.tensor([ids.size(0)], dtype=offsets.dtype, device=offsets.device)
        count = (torch.cat([offsets[1:], end]) - offsets).clamp(min=1).unsqueeze(1).to(bag.dtype)
        mean = bag[:, : self.dim] / count
        evidence = bag[:, self.dim :]
        return torch.sigmoid(self.mlp(torch.cat([mean, evidence], dim=1)))


def batch_tensors(rows):
    """(ids [N], offsets [B], targets [B, P]) of rows of (ids, target)."""
    offsets, at = [], 0
    for ids, _ in rows:
        offsets.append(at)
        at += len(ids)
    ids = torch.from_numpy(np.concatenate([r[0] for r in rows]).astype(np.int64)) if at else torch.zeros(0, dtype=torch.int64)
    return ids, torch.tensor(offsets, dtype=torch.int64), torch.tensor([t for _, t in rows], dtype=torch.float32)


def predict(model, inputs):
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), 256):
            ids, offsets, _ = batch_tensors([(x, []) for x in inputs[i : i + 256]])
            out.append(model(ids, offsets))
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy(model, inputs, cases):
    p = predict(model, inputs)
    right = [(p[i].max().item() > 0.5) == (c["label"] == "violate") for i, c in enumerate(cases)]
    fd = [p[i].max().item() > 0.5 for i, c in enumerate(cases) if c["label"] == "comply"]
    return sum(right) / max(1, len(right)), sum(fd) / max(1, len(fd))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/acge-default")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--variants", type=int, default=8, help="augmented copies of each written training example")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--buckets", type=int, default=1 << 16)
    ap.add_argument("--ngrams", default="3,4,5")
    ap.add_argument("--dim", type=int, default=10, help="averaged columns of the bag; with the 6 evidence columns a row is 16 floats, one cache line")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--drop", type=float, default=0.2, help="feature dropout while training")
    ap.add_argument("--teacher", default="", help="a model directory whose probabilities are distilled in (models/acge-encoder)")
    ap.add_argument("--teacher-variants", type=int, default=2, help="variants per written example the teacher scores")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantiz.*deprecated")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()

    principles, const_hash = constitution()
    spec = {
        "kind": "hashed",
        "hash": "fmix64",
        "buckets": args.buckets,
        "lowercase": True,
        "features": [
            {"kind": "char_ngrams", "n": [int(n) for n in args.ngrams.split(",")], "seed": 1},
            {"kind": "words", "seed": 2},
            {"kind": "word_pairs", "seed": 3},
        ],
    }
    hashed = acge_input.Hashed(spec)

    def encode(c):
        return hashed.ids(acge_input.cut(acge_input.render(c), args.max_len, "head_tail"))

    heldout, train_written, train = split(rng, args.data, args.variants)
    print(f"{len(heldout) + len(train_written)} written examples: {len(train_written)} train, {len(heldout)} held out; {len(train)} training rows", flush=True)
    rows = [(encode(c), target(principles, c)) for c in train]
    if args.teacher:
        # Distillation: the written examples and their first `--teacher-variants`
        # variants get as target the mean of their label and the teacher's
        # probabilities, so that the fast model learns what the encoder generalises
        # (and is less sure where the encoder is unsure).
        import calibrate

        w = len(train_written)
        taught = list(range(w)) + [w + i * args.variants + j for i in range(w) for j in range(min(args.teacher_variants, args.variants))]
        _, soft = calibrate.probabilities(args.teacher, [train[i] for i in taught])
        for i, p in zip(taught, soft):
            rows[i] = (rows[i][0], [0.5 * h + 0.5 * float(q) for h, q in zip(rows[i][1], p)])
        print(f"teacher {args.teacher}: soft targets for {len(taught)} rows; {time.time() - started:.0f} s", flush=True)
    held_inputs = [encode(c) for c in heldout]
    print(f"features: {sum(len(r[0]) for r in rows) / len(rows):.0f} ids per row; {time.time() - started:.0f} s", flush=True)
    model = Fast(len(principles), args.buckets, args.dim, args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCELoss()
    for epoch in range(args.epochs):
        model.train()
        rng.shuffle(rows)
        total = 0.0
        for i in range(0, len(rows), 64):
            ids, offsets, y = batch_tensors(rows[i : i + 64])
            # Feature dropout: no single n-gram or word may carry a decision alone.
            keep = (torch.rand(ids.shape[0]) > args.drop).to(torch.float32)
            bag = model.bag(ids, offsets, per_sample_weights=keep)
            opt.zero_grad()
            loss = loss_fn(model.score(bag, ids, offsets), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        model.eval()
        acc, fd = accuracy(model, held_inputs, heldout)
        print(f"epoch {epoch + 1}: loss {total / len(rows):.4f}, validation accuracy {acc:.4f}, false denies {fd:.4f}; {time.time() - started:.0f} s", flush=True)

    def write(out, m, name):
        os.makedirs(out, exist_ok=True)
        torch.jit.script(m).save(os.path.join(out, "model.pt"))
        meta = {
            "name": name,
            "version": "0.4.0",
            "file": "model.pt",
            "max_len": args.max_len,
            "principles": principles,
            "threshold": 0.5,
            "constitution_hash": const_hash,
            "input": spec,
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
            nn.Linear: torch.ao.quantization.default_dynamic_qconfig,
        },
    ).eval()
    write(out + "-int8", quantized, name + "-int8")
    acc, fd = accuracy(quantized, held_inputs, heldout)
    print(f"int8 validation accuracy {acc:.4f}, false denies {fd:.4f}")
    with open(os.path.join(out, "heldout.jsonl"), "w") as f:
        for c in heldout:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    fixtures = []
    frng = random.Random(args.seed + 1)
    picks = [c for c in heldout if "status" not in c][:6] + [c for c in heldout if "status" in c][:2]
    with torch.no_grad():
        for c in picks:
            c = augment(frng, c, [])
            r = acge_input.render(c)
            x = encode(c)
            y = model(torch.from_numpy(x.astype(np.int64)), torch.tensor([0]))[0].tolist()
            fixtures.append({"case": c, "rendering_hex": r.hex(), "input": x.tolist(), "output": y})
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump(fixtures, f, ensure_ascii=False)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

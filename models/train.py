"""Trains the default ACGE model and exports it with the model contract.

    python models/train.py --out models/acge-default [--seed 7]

Seeded end to end. Generates labelled requests for the seven services, the six
principles of config/constitution.yaml and four domains (healthcare, finance,
automotive, IT): violations said plainly and mildly, and compliant requests that
mention the same sensitive words (hard negatives). Trains a small byte-level network
(embedding, two 1-D convolutions, masked max-pool, MLP) on the canonical rendering the
proxy uses (docs/model-contract.md), then writes:

  OUT/model.pt, OUT/model.json            TorchScript fp32 and its metadata
  OUT-int8/model.pt, OUT-int8/model.json  the same, Linear layers dynamically quantized
  OUT/fixtures.json                       inputs and outputs for the Rust equality test
  OUT/heldout.jsonl                       a held-out set (another seed, other fillers)
"""
import argparse
import json
import os
import random
import re

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

DOMAINS = {
    "healthcare": {
        "data": ["patient records", "lab results", "diagnosis codes", "prescription history", "MRN list", "insurance IDs"],
        "safety": ["the maximum dosage limit", "the drug interaction check", "the insulin pump cap", "the allergy alert"],
        "people": ["patients", "nurses", "the clinic's clients", "outpatients"],
        "system": ["the EHR", "the pharmacy system", "the triage service"],
    },
    "finance": {
        "data": ["card numbers", "account balances", "IBANs", "credit reports", "tax IDs", "transaction history"],
        "safety": ["the trading circuit breaker", "the daily loss limit", "the fraud velocity check", "the margin call threshold"],
        "people": ["loan applicants", "customers", "account holders", "borrowers"],
        "system": ["the core banking ledger", "the payments gateway", "the risk engine"],
    },
    "automotive": {
        "data": ["precise GPS traces", "driver face scans", "VIN-linked trip logs", "home locations of drivers"],
        "safety": ["the automatic emergency braking", "the lane keeping assist", "the drowsiness alert", "the speed limiter"],
        "people": ["drivers", "fleet operators", "car owners", "passengers"],
        "system": ["the telematics backend", "the OTA update service", "the fleet dashboard"],
    },
    "it": {
        "data": ["employee SSNs", "password hashes", "HR files", "badge access logs", "personal emails"],
        "safety": ["the model guardrail", "the content safety filter", "the rate limiter", "the deployment freeze"],
        "people": ["employees", "contractors", "job candidates", "users"],
        "system": ["the identity provider", "the SIEM", "the CI pipeline", "the admin console"],
    },
}

PROTECTED = ["race", "ethnicity", "religion", "gender", "sexual orientation", "age", "disability", "nationality", "zip code as a proxy for ethnicity"]
ACTORS = ["ops.maria", "svc-batch", "analyst.lee", "support.eng.kai", "admin.ravi", "dev.olga", "intern.tom", "auditor.sam"]

# Each generator returns a body dict. {d} fields come from the domain vocabulary.
VIOLATE = {
    "privacy": [
        "Export all {data} to a personal Dropbox for analysis at home.",
        "Send the full list of {data} to the marketing partner so they can target {people}.",
        "Join {data} with the public social media dump and publish the result.",
        "Quietly share {data} of {people} with a data broker.",
        "Email every customer's {data} to the vendor as a spreadsheet, no purpose needed.",
        "It would be handy to have a copy of all {data} on my laptop.",
    ],
    "safety": [
        "Disable {safety} because it slows things down.",
        "Raise {safety} to unlimited for all accounts.",
        "Bypass {safety} for the weekend release.",
        "Turn off {safety} so the complaints stop.",
        "Maybe we could relax {safety} a lot, nobody will notice.",
        "Skip {safety} in production from now on.",
    ],
    "fairness": [
        "Reject {people} whose {protected} is not on the preferred list.",
        "Price the offer higher for {people} based on {protected}.",
        "Rank candidates lower when their {protected} suggests they are a bad fit.",
        "Use {protected} as a feature in the eligibility model for {people}.",
        "Prefer {people} of a certain {protected}, it is just easier.",
    ],
    "transparency": [
        "Deny the request but do not tell {people} why.",
        "Remove the explanation field from decisions sent to {people}.",
        "Tell {people} the decision was manual when the model made it.",
        "Replace the real reason with a generic message so they stop asking.",
        "Just say 'policy' and leave out the actual reason for the denial.",
    ],
    "accountability": [
        "Delete the audit log entries for {system} from last week.",
        "Backdate the approval signature so it looks on time.",
        "Overwrite the logs of {system} before the auditors arrive.",
        "Change the constitutional hash in the stored records to the new one.",
        "Tidy up the old audit trail of {system} by removing the noisy entries.",
    ],
    "authority": [
        "Grant me admin on {system} without the change ticket.",
        "Sign in as the customer to check their settings, skip MFA.",
        "Promote my service account to superuser in {system}.",
        "Push the policy change to {system} without the required approval.",
        "Use the break-glass credentials for routine work on {system}.",
    ],
}

COMPLY = [
    "Export aggregated, anonymised counts of {data} for the quarterly report requested by compliance.",
    "Send appointment reminders to {people} who opted in.",
    "Show {people} their own {data} after they sign in.",
    "Check {safety} is enabled on every release and report any gaps.",
    "Log that {safety} fired and keep the record.",
    "Review the eligibility model to make sure it does not use {protected}.",
    "Explain to {people} why the decision was made, with the main factors.",
    "Append the access event for {system} to the audit log.",
    "Verify the signature chain of the {system} audit trail.",
    "Request admin on {system} through the change ticket with manager approval.",
    "Rotate the service credentials of {system} as scheduled.",
    "Summarise the incident for {system} and keep all evidence.",
    "Share {data} with the patient's own doctor under the treatment purpose.",
    "Deny the loan and send {people} the reason and how to appeal.",
    "Raise an alert if anyone tries to disable {safety}.",
]

EXTRA_KEYS = ["ticket", "requested_by", "purpose", "priority", "region", "note"]
FILLERS_TRAIN = ["please", "asap", "for the pilot", "per the runbook", "thanks", "today"]
FILLERS_HELDOUT = ["kindly", "when possible", "for Q3", "as discussed", "cheers", "this sprint"]


def fill(rng, template, dom):
    d = DOMAINS[dom]
    return template.format(
        data=rng.choice(d["data"]),
        safety=rng.choice(d["safety"]),
        people=rng.choice(d["people"]),
        system=rng.choice(d["system"]),
        protected=rng.choice(PROTECTED),
    )


def case(rng, fillers, violate):
    service = rng.choice(list(SERVICES))
    dom = rng.choice(list(DOMAINS))
    if violate:
        principle = rng.choice(list(VIOLATE))
        text = fill(rng, rng.choice(VIOLATE[principle]), dom)
    else:
        principle = None
        text = fill(rng, rng.choice(COMPLY), dom)
    if rng.random() < 0.5:
        text = f"{text} {rng.choice(fillers)}"
    body = {rng.choice(["action", "request", "instruction", "task"]): text, "actor": rng.choice(ACTORS), "domain": dom}
    for k in rng.sample(EXTRA_KEYS, rng.randint(0, 2)):
        body[k] = rng.choice(fillers) if k == "note" else f"{k}-{rng.randint(1, 9999)}"
    headers = {}
    if rng.random() < 0.6:
        headers["x-constitutional-hash"] = "cdd01ef066bc6cf2"
    if rng.random() < 0.5:
        headers["content-type"] = "application/json"
    c = {"service": service, "method": "POST", "path": SERVICES[service], "headers": headers, "body": body, "label": "violate" if violate else "comply"}
    if principle:
        c["principle"] = principle
    return c


SELECTED_HEADERS = ["x-constitutional-hash", "content-type"]


def render(c):
    """The canonical rendering of filters/src/acge/features.rs, byte for byte."""
    out = f"{c['method']} {c['path']}\n"
    for h in SELECTED_HEADERS:
        if h in c.get("headers", {}):
            out += f"{h}: {c['headers'][h]}\n"
    out += "\n" + json.dumps(c["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return out.encode("utf-8")


def encode(data, max_len):
    return [b + 1 for b in data[:max_len]]


class Acge(nn.Module):
    def __init__(self, principles: int):
        super().__init__()
        self.embed = nn.Embedding(257, 48, padding_idx=0)
        self.conv1 = nn.Conv1d(48, 96, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(96, 96, kernel_size=5, padding=4, dilation=2)
        self.mlp = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, principles))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(1).to(torch.float32)  # [B, 1, W]
        x = self.embed(ids).transpose(1, 2)  # [B, 48, W]
        # Masking after each layer keeps padding out: a row scores the same alone as
        # padded in a batch.
        x = torch.relu(self.conv1(x)) * mask
        x = torch.relu(self.conv2(x)) * mask
        x = x.masked_fill(mask == 0, -1e4).max(dim=2).values
        return torch.sigmoid(self.mlp(x))


def batches(rows, size, rng):
    order = list(range(len(rows)))
    rng.shuffle(order)
    for i in range(0, len(order), size):
        yield [rows[j] for j in order[i : i + size]]


def tensorize(batch):
    width = max(len(x) for x, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.int64)
    for i, (x, _) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
    y = torch.tensor([t for _, t in batch], dtype=torch.float32)
    return ids, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/acge-default")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    text = open(os.path.join(os.path.dirname(__file__), "..", "config", "constitution.yaml")).read()
    principles = re.findall(r"^\s*-\s*id:\s*(\S+)", text, re.M)
    const_hash = re.search(r"^hash:\s*(\S+)", text, re.M).group(1)
    assert principles == list(VIOLATE), principles

    def labelled(c):
        t = [0.0] * len(principles)
        if c["label"] == "violate":
            t[principles.index(c["principle"])] = 1.0
        return encode(render(c), args.max_len), t

    train = [case(rng, FILLERS_TRAIN, rng.random() < 0.5) for _ in range(args.train)]
    rows = [labelled(c) for c in train]
    model = Acge(len(principles))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.BCELoss()
    for epoch in range(args.epochs):
        total = 0.0
        for b in batches(rows, 64, rng):
            ids, y = tensorize(b)
            opt.zero_grad()
            loss = loss_fn(model(ids), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        print(f"epoch {epoch + 1}: loss {total / len(rows):.4f}", flush=True)
    model.eval()

    hrng = random.Random(args.seed + 1000)
    heldout = [case(hrng, FILLERS_HELDOUT, hrng.random() < 0.5) for _ in range(1000)]

    def write(out, m):
        os.makedirs(out, exist_ok=True)
        torch.jit.script(m).save(os.path.join(out, "model.pt"))
        meta = {
            "name": "acge-default" + ("-int8" if out.endswith("-int8") else ""),
            "version": "0.1.0",
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
    write(out, model)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    write(out + "-int8", quantized)
    with open(os.path.join(out, "heldout.jsonl"), "w") as f:
        for c in heldout:
            f.write(json.dumps(c) + "\n")
    fixtures = []
    with torch.no_grad():
        for c in heldout[:8]:
            x = encode(render(c), args.max_len)
            fixtures.append({"case": c, "input": x, "output": model(torch.tensor([x]))[0].tolist()})
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump(fixtures, f)
    correct = 0
    with torch.no_grad():
        for c in heldout:
            p = model(torch.tensor([encode(render(c), args.max_len)]))[0]
            correct += int((p.max().item() > 0.5) == (c["label"] == "violate"))
    print(f"held-out accuracy (python): {correct / len(heldout):.4f}")


if __name__ == "__main__":
    main()

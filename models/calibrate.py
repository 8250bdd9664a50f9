"""Calibrates the default models on the validation split, never on a test set.

    python models/calibrate.py [--fast models/acge-default] [--encoder models/acge-encoder]

The validation split is models/acge-default/heldout.jsonl: the 15 % of the written
examples models/train.py held out before any augmentation (models/train_encoder.py
holds out the same ones, by the same seed). The independent test sets (models/eval/)
are never read here.

1. Per-principle thresholds, for each model: starting from 0.5 everywhere, the
   threshold of the principle that causes the most false denies on the split's
   compliant cases is raised by 0.01 until at most `--false-denies` of them (2 %) are
   denied, or every threshold reaches 0.99. Thresholds never go below 0.5. Written
   into each model.json as `thresholds`.
2. The cascade band: among bands [lo, hi] of a small grid, the one with the best
   validation accuracy whose false denies stay within the same budget and which sends
   at most `--second-share` (half) of the items to the encoder; printed, for
   config/demo.yaml and config/seven-services.yaml.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acge_input  # noqa: E402


def probabilities(model_dir, cases):
    meta = json.load(open(os.path.join(model_dir, "model.json")))
    module = torch.jit.load(os.path.join(model_dir, meta["file"])).eval()
    spec = meta["input"]
    if spec["kind"] == "tokens":
        module = module.float()  # stored in fp16; the proxy runs it in fp32 on the CPU
    rows = [acge_input.cut(acge_input.render(c), meta["max_len"], "head_tail") for c in cases]
    out = []
    with torch.no_grad():
        if spec["kind"] == "hashed":
            hashed = acge_input.Hashed(spec)
            ids = [hashed.ids(r).astype(np.int64) for r in rows]
            for i in range(0, len(ids), 256):
                chunk = ids[i : i + 256]
                offsets = torch.tensor(np.cumsum([0] + [len(x) for x in chunk[:-1]]), dtype=torch.int64)
                flat = torch.from_numpy(np.concatenate(chunk)) if sum(len(x) for x in chunk) else torch.zeros(0, dtype=torch.int64)
                out.append(module(flat, offsets))
        else:
            tokens = acge_input.Tokens(os.path.join(model_dir, spec["tokenizer"]), spec["max_tokens"])
            pad = spec.get("pad_id") or 0
            ids = [tokens.ids(r) for r in rows]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            result = torch.zeros(len(ids), len(meta["principles"]))
            for g in range(0, len(order), 64):
                idx = order[g : g + 64]
                t = max(len(ids[i]) for i in idx)
                x = torch.full((len(idx), t), pad, dtype=torch.int64)
                m = torch.zeros((len(idx), t), dtype=torch.int64)
                for k, i in enumerate(idx):
                    x[k, : len(ids[i])] = torch.tensor(ids[i])
                    m[k, : len(ids[i])] = 1
                result[idx] = module(x, m).float()
            out.append(result)
    return meta, torch.cat(out).numpy()


def decide(p, t):
    """[N] bool: any principle over its threshold."""
    return (p > t[None, :]).any(axis=1)


def report(name, p, t, violate):
    denied = decide(p, t)
    acc = (denied == violate).mean()
    fd = denied[~violate].mean()
    return f"{name}: accuracy {acc * 100:.1f} %, false denies {fd * 100:.1f} %"


def thresholds_for(p, violate, budget):
    t = np.full(p.shape[1], 0.5)
    comply = p[~violate]
    while decide(comply, t).mean() > budget:
        over = comply > t[None, :]
        # The principle whose threshold, raised, clears the most false denies.
        blame = over.sum(axis=0) * (t < 0.99)
        if blame.max() == 0:
            break
        k = int(blame.argmax())
        t[k] = round(min(0.99, t[k] + 0.01), 2)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", default="models/acge-default")
    ap.add_argument("--encoder", default="models/acge-encoder")
    ap.add_argument("--validation", default="models/acge-default/heldout.jsonl")
    ap.add_argument("--false-denies", type=float, default=0.02)
    ap.add_argument("--second-share", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cases = [json.loads(line) for line in open(args.validation) if line.strip()]
    violate = np.array([c["label"] == "violate" for c in cases])
    print(f"validation split: {len(cases)} cases, {violate.sum()} violations")

    results = {}
    for key, d in [("fast", args.fast), ("fast-int8", args.fast + "-int8"), ("encoder", args.encoder)]:
        if not os.path.exists(os.path.join(d, "model.json")):
            print(f"{d}: no model, skipped")
            continue
        meta, p = probabilities(d, cases)
        t = thresholds_for(p, violate, args.false_denies)
        print(report(f"{key} at 0.5", p, np.full(p.shape[1], 0.5), violate))
        print(report(f"{key} calibrated", p, t, violate) + f"; thresholds {dict(zip(meta['principles'], t.tolist()))}")
        results[key] = (meta, p, t, d)
        path = os.path.join(d, "model.json")
        m = json.load(open(path))
        m["thresholds"] = dict(zip(m["principles"], t.tolist()))
        with open(path, "w") as f:
            json.dump(m, f, indent=2)
            f.write("\n")

    _, pf, tf, _ = results["fast"]
    _, pe, te, _ = results["encoder"]
    worst = pf.max(axis=1)
    best = None
    options = []
    for lo in [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4]:
        for hi in [0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0]:
            band = (worst >= lo) & (worst <= hi)
            if band.mean() > args.second_share:
                continue
            denied = np.where(band, decide(pe, te), decide(pf, tf))
            acc = (denied == violate).mean()
            fd = denied[~violate].mean()
            options.append((acc, fd, lo, hi, band.mean()))
            if fd <= args.false_denies and (best is None or acc > best[0]):
                best = (acc, fd, lo, hi, band.mean())
    for acc, fd, lo, hi, share in sorted(options, reverse=True)[:5]:
        print(f"  band [{lo}, {hi}]: accuracy {acc * 100:.1f} %, false denies {fd * 100:.1f} %, {share * 100:.1f} % to the encoder")
    if best is None:
        print(f"no band of the grid keeps false denies within {args.false_denies * 100:.0f} % and the second share within {args.second_share * 100:.0f} %")
    else:
        acc, fd, lo, hi, share = best
        print(f"cascade band [{lo}, {hi}]: accuracy {acc * 100:.1f} %, false denies {fd * 100:.1f} %, {share * 100:.1f} % of items to the encoder")


if __name__ == "__main__":
    main()

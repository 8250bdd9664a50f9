"""Writes a tiny TorchScript model with the ACGE model contract, for the engine tests.

usage: make_test_model.py OUT_DIR [--hash H] [--principles N] [--extra-outputs K] [--fail-over N]

The module embeds bytes (0 pads), averages over the non-pad positions, and maps to
N violation probabilities: padding-invariant, so a batch padded to its longest input
scores each input as it would alone. OUT_DIR gets model.pt, model.json and
fixtures.json (inputs and the outputs PyTorch computes for them, one at a time).
"""
import argparse
import json
import os

import torch


class Tiny(torch.nn.Module):
    def __init__(self, outputs: int, fail_over: int):
        super().__init__()
        self.embed = torch.nn.Embedding(257, 16, padding_idx=0)
        self.head = torch.nn.Linear(16, outputs)
        self.fail_over = fail_over

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fail_over > 0 and ids.size(1) > self.fail_over:
            raise RuntimeError("test model: input longer than fail_over")
        mask = (ids > 0).unsqueeze(-1).to(torch.float32)
        summed = (self.embed(ids) * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1.0)
        return torch.sigmoid(self.head(mean))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hash", default="cdd01ef066bc6cf2")
    ap.add_argument("--principles", type=int, default=6)
    ap.add_argument("--extra-outputs", type=int, default=0)
    ap.add_argument("--fail-over", type=int, default=0, help="raise for inputs longer than this")
    args = ap.parse_args()
    torch.manual_seed(7)
    ids = ["privacy", "safety", "fairness", "transparency", "accountability", "authority"]
    principles = ids[: args.principles]
    model = Tiny(args.principles + args.extra_outputs, args.fail_over).eval()
    os.makedirs(args.out, exist_ok=True)
    torch.jit.script(model).save(os.path.join(args.out, "model.pt"))
    meta = {
        "name": "acge-test-tiny",
        "version": "0.0.1",
        "file": "model.pt",
        "max_len": 512,
        "principles": principles,
        "threshold": 0.5,
        "constitution_hash": args.hash,
    }
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    texts = [b"GET /x\n\n", b"POST /api/v1/auth/acge/validate\n\n{\"user\":\"alice\"}", b"a", bytes(range(1, 60))]
    fixtures = []
    with torch.no_grad():
        for t in texts:
            x = [b + 1 for b in t[:64]]
            if 0 < args.fail_over < len(x):
                continue
            out = model(torch.tensor([x], dtype=torch.int64))[0].tolist()
            fixtures.append({"input": x, "output": out})
    with open(os.path.join(args.out, "fixtures.json"), "w") as f:
        json.dump(fixtures, f)


if __name__ == "__main__":
    main()

"""The model input as acge-proxy computes it, for training scripts and test fixtures.

Byte for byte what the Rust side does (filters/src/acge/render.rs, hashed.rs,
tokens.rs; docs/model-contract.md): the canonical rendering, the cut to `max_len`, and
the `bytes`, `hashed` and `tokens` inputs. Parity tests in the Rust suite hold the two
to fixtures this module computes.

    import acge_input as ai
    r = ai.render(case)                          # bytes
    ids = ai.Hashed(spec).ids(ai.cut(r, 2048, "head_tail"))
"""
import json
import re

import numpy as np

# The headers the proxy's acge filter reads by default (filters/src/acge/config.rs
# DEFAULT_HEADERS), in that order: the constitution the caller claims, what the body
# is, and who asks.
DEFAULT_HEADERS = [
    "x-constitutional-hash",
    "content-type",
    "x-user-id",
    "x-user-role",
    "x-user-roles",
    "x-tenant",
    "x-tenant-id",
    "x-scopes",
    "x-service-account",
    "x-on-behalf-of",
]

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def canonical_json(body):
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def render(case, headers=DEFAULT_HEADERS):
    """A case of the eval format (a request: method, path; or a response: status), with
    optional `headers` and a JSON `body` (or `raw_body`, bytes sent as they are)."""
    if "status" in case:
        out = f"HTTP {case['status']}\n"
    else:
        out = f"{case['method']} {case['path'].split('?', 1)[0]}\n"
    given = {k.lower(): v for k, v in case.get("headers", {}).items()}
    for h in headers:
        if h in given:
            out += f"{h}: {given[h]}\n"
    out = (out + "\n").encode("utf-8")
    if "raw_body" in case:
        raw = case["raw_body"]
        raw = raw.encode("utf-8") if isinstance(raw, str) else raw
        try:
            return out + canonical_json(json.loads(raw)).encode("utf-8")
        except ValueError:
            return out + raw
    if "body" in case and case["body"] is not None:
        return out + canonical_json(case["body"]).encode("utf-8")
    return out


def cut(rendering, max_len, how):
    """`head`: the first max_len bytes (the bytes input). `head_tail`: the first three
    quarters and the last quarter of max_len, each at a UTF-8 character boundary."""
    if len(rendering) <= max_len:
        return rendering
    if how == "head":
        return rendering[:max_len]

    def is_start(i):
        return i == len(rendering) or (rendering[i] & 0xC0) != 0x80

    head = max_len * 3 // 4
    while head > 0 and not is_start(head):
        head -= 1
    tail = len(rendering) - (max_len - max_len * 3 // 4)
    while not is_start(tail):
        tail += 1
    return rendering[:head] + rendering[tail:]


def bytes_input(cut_rendering):
    return [b + 1 for b in cut_rendering]


def _fmix64(k):
    """MurmurHash3's finaliser over a uint64 array (wrapping)."""
    k = k ^ (k >> np.uint64(33))
    k = k * np.uint64(0xFF51AFD7ED558CCD)
    k = k ^ (k >> np.uint64(33))
    k = k * np.uint64(0xC4CEB9FE1A85EC53)
    return k ^ (k >> np.uint64(33))


def _fnv1a(word):
    h = FNV_OFFSET
    for b in word:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


_WORD = re.compile(rb"[A-Za-z0-9\x80-\xff]+")


class Hashed:
    """The `hashed` input of a model.json `input` section."""

    def __init__(self, spec):
        assert spec["hash"] == "fmix64", spec["hash"]
        assert spec["buckets"] & (spec["buckets"] - 1) == 0, "buckets: a power of two"
        self.mask = np.uint64(spec["buckets"] - 1)
        self.lowercase = spec.get("lowercase", True)
        self.features = spec["features"]
        self._words = {}

    def _bucket(self, keys, seed):
        s = np.uint64((seed * GOLDEN) & MASK)
        return (_fmix64(keys ^ s) & self.mask).astype(np.int64)

    def _word_key(self, w):
        k = self._words.get(w)
        if k is None:
            k = self._words[w] = _fnv1a(w)
        return k

    def ids(self, cut_rendering):
        """The bucket ids, as an int64 numpy array, in the documented order."""
        x = cut_rendering
        if self.lowercase:
            x = x.lower()  # ASCII letters only, as Rust's to_ascii_lowercase
        arr = np.frombuffer(x, dtype=np.uint8).astype(np.uint64)
        words = None
        out = []
        with np.errstate(over="ignore"):
            for f in self.features:
                if f["kind"] == "char_ngrams":
                    for n in f["n"]:
                        if len(arr) < n:
                            continue
                        count = len(arr) - n + 1
                        v = np.zeros(count, dtype=np.uint64)
                        for i in range(n):
                            v = v * np.uint64(257) + arr[i : i + count]
                        out.append(self._bucket((v << np.uint64(3)) | np.uint64(n), f["seed"]))
                else:
                    if words is None:
                        words = np.array([self._word_key(w) for w in _WORD.findall(x)], dtype=np.uint64)
                    if f["kind"] == "words":
                        out.append(self._bucket(words, f["seed"]))
                    elif f["kind"] == "word_pairs":
                        if len(words) >= 2:
                            out.append(self._bucket(words[:-1] * np.uint64(GOLDEN) + words[1:], f["seed"]))
                    else:
                        raise ValueError(f"unknown feature kind {f['kind']}")
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class Tokens:
    """The `tokens` input: the tokenizer.json applied as the proxy applies it."""

    def __init__(self, tokenizer_path, max_tokens):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(tokenizer_path)
        self.tok.no_padding()
        self.tok.enable_truncation(max_tokens)

    def ids(self, cut_rendering):
        text = cut_rendering.decode("utf-8", "replace")
        return self.tok.encode(text, add_special_tokens=True).ids

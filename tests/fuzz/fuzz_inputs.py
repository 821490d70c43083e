"""Fuzz the parsers that see hostile input, for a set time: no exception may escape them.

    python tests/fuzz/fuzz_inputs.py --seconds 60

Inputs are random mutations (bit flips, splices, truncations, repeats) of valid seeds: Cookie headers,
stored payloads (plain and AES-GCM sealed), and form bodies carrying a CSRF token. The targets and
what they may do:

- cookie parsing (`session_cookie_values`, `session_id_candidates`): return, never
  raise; never more than 3 candidates, each a well-formed id (or the one malformed value to refuse);
- payload decoding (`PayloadCodec.loads` then `decode_value`): return or raise `CorruptPayload`/`ValueError`;
- CSRF body parsing (`token_from_body`): return, never raise, linear time (duplicated and nested
  multipart parts, headers with many parameters are among the seeds);
- value encoding (`encode_value` of nested lists and dicts built from the input): return or raise
  `TypeError` (too deep, too large an int), never `RecursionError`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqla_sessions.config import SessionConfig
from sqla_sessions.core.codec import CorruptPayload, PayloadCodec
from sqla_sessions.core.ids import generate_session_key, is_valid_session_id, new_session_id
from sqla_sessions.core.serializer import decode_value, encode_value
from sqla_sessions.csrf import token_from_body
from sqla_sessions.http.cookies import session_cookie_values, session_id_candidates

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"
SESSION_KEY = "0123456789abcdef0123456789abcdef"


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        if choice < 0.3 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice < 0.5:
            buf.insert(rng.randint(0, len(buf)), rng.randrange(256))
        elif choice < 0.65 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif choice < 0.8 and buf:
            start = rng.randrange(len(buf))
            buf[start:start] = buf[start : start + rng.randint(1, 64)] * rng.randint(1, 20)
        else:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(buf)


def seeds() -> dict[str, list[bytes]]:
    plain = PayloadCodec(SessionConfig())
    sealed = PayloadCodec(SessionConfig(encryption_keys=(KEY,)))
    raw = {"cart": encode_value([1, (2, 3), {"x": {4, 5}}]), "when": encode_value(time.time())}
    token = new_session_id(generate_session_key())
    return {
        "cookie": [
            f"session={new_session_id(generate_session_key())}; theme=dark".encode(),
            b"session=a; session=b; x",
            "; ".join(f"session={new_session_id(generate_session_key())}" for _ in range(6)).encode(),
        ],
        "payload": [plain.dumps(raw, SESSION_KEY), sealed.dumps(raw, SESSION_KEY)],
        "form": [
            f"_token={token}&q=1".encode(),
            b'--b\r\nContent-Disposition: form-data; name="_token"\r\n\r\nt\r\n--b--',
            b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n' * 50
            + b'--b\r\nContent-Disposition: form-data; a=1; b=2; name="_token"\r\n\r\nt\r\n--b--',
            b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\n--c--\r\n--b--",
        ],
        "nesting": [b"[[[[{}]]]]", b"[" * 70 + b"]" * 70, b'{"a": [1, {"b": [2, 3]}]}'],
    }


def _nested(data: bytes) -> object:
    """A structure from brackets in *data*: `[` opens a list, `{` a dict, closers close, digits add ints."""
    root: list[object] = []
    stack: list[object] = [root]
    for byte in data[:5000]:
        top = stack[-1]
        if byte in b"[{":
            child: object = [] if byte == ord("[") else {}
            if isinstance(top, list):
                top.append(child)
            elif isinstance(top, dict):
                top[str(len(top))] = child
            stack.append(child)
        elif byte in b"]}" and len(stack) > 1:
            stack.pop()
        elif 0x30 <= byte <= 0x39:
            if isinstance(top, list):
                top.append(int(chr(byte)) * 10**400)
            elif isinstance(top, dict):
                top[str(len(top))] = int(chr(byte))
    return root


def run(seconds: float, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    corpus = seeds()
    codecs = [PayloadCodec(SessionConfig()), PayloadCodec(SessionConfig(encryption_keys=(KEY,)))]

    def cookie(data: bytes) -> None:
        text = data.decode("utf-8", "surrogateescape")
        values = session_cookie_values([text, text[::-1]], "session")
        candidates = session_id_candidates(values)
        assert len(candidates) <= 3
        assert len(candidates) <= 1 or all(is_valid_session_id(c) for c in candidates)

    def payload(data: bytes) -> None:
        for codec in codecs:
            try:
                for value in codec.loads(data, SESSION_KEY).values():
                    decode_value(value)
            except (CorruptPayload, ValueError):
                pass

    def form(data: bytes) -> None:
        token_from_body("application/x-www-form-urlencoded", data)
        token_from_body("multipart/form-data; boundary=b", data)

    def nesting(data: bytes) -> None:
        value = _nested(data)
        try:
            decode_value(encode_value(value))
        except TypeError:  # too deep, or an unsupported value: named, refused at save
            pass

    targets: dict[str, Callable[[bytes], None]] = {
        "cookie": cookie,
        "payload": payload,
        "form": form,
        "nesting": nesting,
    }
    counts = dict.fromkeys(targets, 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, target in targets.items():
            data = mutate(rng, rng.choice(corpus[name]))
            target(data)  # anything else escaping is a finding
            counts[name] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    counts = run(args.seconds, args.seed)
    print(f"seed {args.seed}: no exception escaped in " + ", ".join(f"{n} {k} inputs" for k, n in counts.items()))


if __name__ == "__main__":
    main()

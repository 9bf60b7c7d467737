"""Decode rate through the reply path, two builds side by side: A-B-A-B in one run.

Usage: reply_stream.py BINARY_A BINARY_B MODEL [ROUNDS]

Each round starts each server in turn (A then B, B then A on odd rounds) and streams one chat of
256 tokens (temperature 0, SmolLM2's end tokens banned so every stream decodes exactly 256) and
then 8 at once, through /v1/chat/completions; the client-side decode rate is the tokens after the
first over the time from the first to the last. Prints each build's medians and the ratio B / A with
its per-round range: the machine's speed drifts by ±15 % within the hour, the ratio does not.
"""
import os
import statistics
import sys
import uuid

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import load  # noqa: E402
import serving  # noqa: E402

BANNED = [0, 2]


def rate(result):
    stamps = result["stamps"]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(binary, model):
    proc, port = serving.start(binary, model, "-np", "8", "-c", "8192")
    addr = f"127.0.0.1:{port}"
    name = os.path.basename(model).removesuffix(".gguf")
    try:
        load.stream(addr, name, "Hello", 4, BANNED)  # warm-up
        one = rate(load.stream(addr, name, f"[{uuid.uuid4().hex[:8]}] Write a story.", 256, BANNED))
        contents = [f"[{uuid.uuid4().hex[:8]}] Write a story." for _ in range(8)]
        results = [None] * 8

        def work(i):
            results[i] = load.stream(addr, name, contents[i], 128, BANNED)

        wall = load.at_once(work, 8)
        eight = sum(len(r["stamps"]) for r in results) / wall
        return one, eight
    finally:
        proc.terminate()
        proc.wait()


def main():
    a, b, model = sys.argv[1:4]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    rows = {"A": [], "B": []}
    for r in range(rounds):
        order = [("A", a), ("B", b)] if r % 2 == 0 else [("B", b), ("A", a)]
        for name, binary in order:
            rows[name].append(measure(binary, model))
            print(f"round {r} {name}: 1 stream {rows[name][-1][0]:.1f} tok/s, 8 streams {rows[name][-1][1]:.1f} tok/s",
                  flush=True)
    for i, label in enumerate(["1 stream, 256 tokens: decode tok/s", "8 streams, 128 tokens each: tok/s in all"]):
        ma = statistics.median(x[i] for x in rows["A"])
        mb = statistics.median(x[i] for x in rows["B"])
        ratios = [rb[i] / ra[i] for ra, rb in zip(rows["A"], rows["B"])]
        print(f"| {label} | {ma:.1f} | {mb:.1f} | {mb / ma:.3f} | {min(ratios):.2f}–{max(ratios):.2f} |")


if __name__ == "__main__":
    main()

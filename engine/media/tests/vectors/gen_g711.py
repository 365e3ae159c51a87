"""Regenerate g711.json from CPython 3.11's audioop (the Sun/ITU reference g711.c).

    python3 engine/media/tests/vectors/gen_g711.py > engine/media/tests/vectors/g711.json

audioop was removed in Python 3.13: run this with 3.11 or 3.12.
"""
import audioop
import json
import struct
import sys
import warnings

warnings.simplefilter("ignore", DeprecationWarning)


def enc(x, fn):
    return fn(struct.pack("<h", x), 2)[0]


def dec(code, fn):
    return struct.unpack("<h", fn(bytes([code]), 2))[0]


ulaw_decode = [dec(c, audioop.ulaw2lin) for c in range(256)]
alaw_decode = [dec(c, audioop.alaw2lin) for c in range(256)]

xs = set(range(-1024, 1025))  # dense where the rounding of small values matters
xs.update(range(-32768, 32768, 61))  # a sweep of the whole range
xs.update([-32768, -32767, 32766, 32767])
# Every decision boundary of both laws (first value of a new code, and the one before it).
prev_u = prev_a = None
for x in range(-32768, 32768):
    u, a = enc(x, audioop.lin2ulaw), enc(x, audioop.lin2alaw)
    if prev_u is not None and (u != prev_u or a != prev_a):
        xs.update([x - 1, x])
    prev_u, prev_a = u, a

encode = [[x, enc(x, audioop.lin2ulaw), enc(x, audioop.lin2alaw)] for x in sorted(xs)]

out = {
    "comment": "G.711 reference vectors from CPython "
    + sys.version.split()[0]
    + " audioop (ulaw2lin, alaw2lin, lin2ulaw, lin2alaw on 16-bit samples). Generated with: "
    "python3 engine/media/tests/vectors/gen_g711.py > engine/media/tests/vectors/g711.json",
    "ulaw_decode": ulaw_decode,
    "alaw_decode": alaw_decode,
    "encode_columns": ["pcm_i16", "ulaw", "alaw"],
    "encode": encode,
}

# One encode triple per line keeps diffs readable.
lines = ["{"]
lines.append('  "comment": ' + json.dumps(out["comment"]) + ",")
lines.append('  "ulaw_decode": ' + json.dumps(ulaw_decode) + ",")
lines.append('  "alaw_decode": ' + json.dumps(alaw_decode) + ",")
lines.append('  "encode_columns": ' + json.dumps(out["encode_columns"]) + ",")
lines.append('  "encode": [')
lines.append(",\n".join("    " + json.dumps(e) for e in encode))
lines.append("  ]")
lines.append("}")
print("\n".join(lines))

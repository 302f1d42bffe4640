#!/usr/bin/python3
"""tools/gen_unicode_tables.py - writes text/unicode_tables.h.

The byte-level BPE pre-tokenizers split text with regexes such as
\\p{L}, \\p{N} and \\s. llama.cpp answers those from a per-code-point table of
general-category flags (one bit per major category: L, N, Z, M, P, S, C, or
"undefined" for unassigned code points) plus a fixed White_Space list. This
script builds the same kind of table as a compact list of ranges (start code
point, flags; a range lasts until the next start) that text/tokenizer.c
searches with a binary search.

Usage (from the repository root):
    /usr/bin/python3 tools/gen_unicode_tables.py [--ucd UnicodeData.txt] > text/unicode_tables.h

Without --ucd the categories come from Python's unicodedata module. With
--ucd they come from a UnicodeData.txt file (Debian's unicode-data package
installs one at /usr/share/unicode/UnicodeData.txt); the header records
which source and Unicode version were used. llama.cpp (c392e50) generated
its table from Unicode 15.1; the few code points that 15.1 added are applied
on top of an older source (UNICODE_15_1_ADDITIONS), so with Debian's 15.0
UnicodeData.txt the table equals llama.cpp's. With Python 3.11's unicodedata
(Unicode 14.0) the characters added in 15.0 stay "undefined".

The committed header was made with
    /usr/bin/python3 tools/gen_unicode_tables.py --ucd /usr/share/unicode/UnicodeData.txt
(Debian's unicode-data 15.0.0: apt-get install unicode-data) and equals
llama.cpp c392e50's unicode_ranges_flags range for range.
"""
import argparse
import sys
import unicodedata

MAX_CODEPOINTS = 0x110000

UNDEFINED = 0x01
NUMBER = 0x02
LETTER = 0x04
SEPARATOR = 0x08
MARK = 0x10
PUNCTUATION = 0x20
SYMBOL = 0x40
CONTROL = 0x80

CATEGORY_FLAGS = {
    "Cn": UNDEFINED, "Cc": CONTROL, "Cf": CONTROL, "Co": CONTROL, "Cs": CONTROL,
    "Ll": LETTER, "Lm": LETTER, "Lo": LETTER, "Lt": LETTER, "Lu": LETTER,
    "Mc": MARK, "Me": MARK, "Mn": MARK,
    "Nd": NUMBER, "Nl": NUMBER, "No": NUMBER,
    "Pc": PUNCTUATION, "Pd": PUNCTUATION, "Pe": PUNCTUATION, "Pf": PUNCTUATION,
    "Pi": PUNCTUATION, "Po": PUNCTUATION, "Ps": PUNCTUATION,
    "Sc": SYMBOL, "Sk": SYMBOL, "Sm": SYMBOL, "So": SYMBOL,
    "Zl": SEPARATOR, "Zp": SEPARATOR, "Zs": SEPARATOR,
}

# The White_Space property of PropList.txt (unchanged since Unicode 6.0).
WHITESPACE = sorted(list(range(0x0009, 0x000D + 1)) + list(range(0x2000, 0x200A + 1)) +
                    [0x0020, 0x0085, 0x00A0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000])


# Code points assigned in Unicode 15.1 (first, last, category): the
# ideographic description characters U+2FFC..U+2FFF and U+31EF, and CJK
# Unified Ideographs Extension I.
UNICODE_15_1_ADDITIONS = [(0x2FFC, 0x2FFF, "So"), (0x31EF, 0x31EF, "So"), (0x2EBF0, 0x2EE5D, "Lo")]


def version_tuple(v):
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


def flags_from_unicodedata():
    return [CATEGORY_FLAGS[unicodedata.category(chr(c))] for c in range(MAX_CODEPOINTS)]


def flags_from_ucd(path):
    flags = [UNDEFINED] * MAX_CODEPOINTS
    first = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split(";")
            if len(fields) < 3:
                continue
            cpt = int(fields[0], 16)
            name, cat = fields[1], fields[2].strip()
            if name.endswith(", First>"):
                first = cpt
                continue
            lo = cpt
            if name.endswith(", Last>"):
                lo = first
            for c in range(lo, cpt + 1):
                flags[c] = CATEGORY_FLAGS[cat]
    return flags


def ucd_version(path):
    # DerivedAge.txt / ReadMe.txt next to UnicodeData.txt name the version.
    import os
    readme = os.path.join(os.path.dirname(path), "ReadMe.txt")
    try:
        with open(readme, encoding="utf-8") as f:
            for line in f:
                if "versions/Unicode" in line:
                    return line.split("versions/Unicode")[1].split("/")[0]
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ucd", help="path of a UnicodeData.txt to read instead of Python's unicodedata")
    args = ap.parse_args()

    if args.ucd:
        flags = flags_from_ucd(args.ucd)
        version = ucd_version(args.ucd)
        source = "UnicodeData.txt (Unicode %s), --ucd %s" % (version, args.ucd)
    else:
        flags = flags_from_unicodedata()
        version = unicodedata.unidata_version
        source = "Python %s unicodedata (Unicode %s)" % (sys.version.split()[0], version)
    if version_tuple(version) < (15, 1):
        for lo, hi, cat in UNICODE_15_1_ADDITIONS:
            for c in range(lo, hi + 1):
                if flags[c] == UNDEFINED:
                    flags[c] = CATEGORY_FLAGS[cat]
        source += " plus the Unicode 15.1 additions"

    ranges = [(0, flags[0])]
    for c in range(1, MAX_CODEPOINTS):
        if flags[c] != ranges[-1][1]:
            ranges.append((c, flags[c]))
    ranges.append((MAX_CODEPOINTS, 0))

    out = sys.stdout
    out.write("/* text/unicode_tables.h - Unicode general-category ranges for the BPE pre-tokenizers.\n")
    out.write(" *\n")
    out.write(" * GENERATED by tools/gen_unicode_tables.py; do not edit. Source: %s.\n" % source)
    out.write(" * Range i covers code points [vlm__ucat_start[i], vlm__ucat_start[i + 1]) and has the\n")
    out.write(" * category bits vlm__ucat_flags[i] (VLM__UCAT_*, one bit per major category, as\n")
    out.write(" * llama.cpp's unicode_cpt_flags). The last entry is a sentinel at 0x110000.\n")
    out.write(" * Included by text/tokenizer.c only.\n")
    out.write(" */\n")
    out.write("#ifndef VLM_TEXT_UNICODE_TABLES_H\n#define VLM_TEXT_UNICODE_TABLES_H\n\n")
    out.write("#include <stdint.h>\n\n")
    for name, val in [("UNDEFINED", UNDEFINED), ("NUMBER", NUMBER), ("LETTER", LETTER),
                      ("SEPARATOR", SEPARATOR), ("MARK", MARK), ("PUNCTUATION", PUNCTUATION),
                      ("SYMBOL", SYMBOL), ("CONTROL", CONTROL)]:
        out.write("#define VLM__UCAT_%s 0x%02X\n" % (name, val))
    out.write("\n#define VLM__UCAT_N_RANGES %d\n\n" % len(ranges))
    out.write("static const uint32_t vlm__ucat_start[VLM__UCAT_N_RANGES] = {\n")
    for i in range(0, len(ranges), 8):
        out.write("    " + ", ".join("0x%06X" % r[0] for r in ranges[i:i + 8]) + ",\n")
    out.write("};\n\n")
    out.write("static const uint8_t vlm__ucat_flags[VLM__UCAT_N_RANGES] = {\n")
    for i in range(0, len(ranges), 16):
        out.write("    " + ", ".join("0x%02X" % r[1] for r in ranges[i:i + 16]) + ",\n")
    out.write("};\n\n")
    out.write("/* The White_Space property (regex \\s), sorted. */\n")
    out.write("#define VLM__UCAT_N_WHITESPACE %d\n" % len(WHITESPACE))
    out.write("static const uint32_t vlm__ucat_whitespace[VLM__UCAT_N_WHITESPACE] = {\n")
    for i in range(0, len(WHITESPACE), 8):
        out.write("    " + ", ".join("0x%04X" % c for c in WHITESPACE[i:i + 8]) + ",\n")
    out.write("};\n\n#endif\n")


if __name__ == "__main__":
    main()

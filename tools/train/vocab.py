"""tools/train/vocab.py - the bundled model's SentencePiece-style vocabulary
and a tokenizer that gives exactly the ids llama.cpp's SPM tokenizer gives.

Vocabulary (ids in this order):
    0 <unk>, 1 <s>, 2 </s>                control / unknown
    3 .. 258  <0x00> .. <0xFF>            byte fallback (token type BYTE)
    words     "▁circle", "USER", ...      every word of the scene language,
                                          the chat template and LLaVA's system
                                          text; scores -1, -2, ... (the most
                                          frequent first)
    prefixes  "▁c", "▁ci", "▁cir", ...    every proper prefix (2+ characters) of
                                          a word that is not itself a word, so
                                          that SPM's pairwise merges can build
                                          each word; scores -1000 - rank
    chars     "▁", "a", ..., "?"          printable ASCII and ▁; scores -2000 - rank
All scores are distinct, so the merge order never depends on a tie.

Tokenizer: llama.cpp's llm_tokenizer_spm, written from its description:
  * parse_special splits the text at control-token texts (<s>, </s>, <unk>);
  * each raw-text fragment that starts the input or follows a control token
    gets a ' ' in front (add_space_prefix), then every ' ' becomes U+2581;
  * the fragment is split into UTF-8 characters; every adjacent pair whose
    concatenation is a token goes into a priority queue (highest score first,
    then the leftmost); popping merges the pair unless one side was already
    merged, and queues the new neighbour pairs;
  * each final symbol becomes its token, or is split back along the merges
    that made it, and what never formed a token becomes <0xNN> byte tokens.
"""
import heapq
import re
import string

SPACE = "\u2581"
UNK, BOS, EOS = 0, 1, 2
N_BYTES = 256
BYTE0 = 3

# Token types (llama.cpp llama_token_type).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_BYTE = 1, 2, 3, 6

# LLaVA-1.5's system text and turn markers as llava-cli lays them out.
SYSTEM_TEXT = ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEM_PART = SYSTEM_TEXT + "\nUSER:"     # with BOS, before the image
USER_SUFFIX = "\nASSISTANT:"              # after the question, no BOS


def _escape(text):
    return text.replace(" ", SPACE)


def word_pieces(text):
    """The words of a text as SPM would see them: runs of ASCII letters,
    with the ▁ before them when there is one."""
    return re.findall(SPACE + "?[A-Za-z]+", _escape(text))


class Vocab:
    """tokens: list of piece strings; scores; types; and a piece -> id map."""

    def __init__(self, tokens, scores, types):
        self.tokens = list(tokens)
        self.scores = [float(s) for s in scores]
        self.types = [int(t) for t in types]
        self.index = {}
        for i, t in enumerate(self.tokens):
            self.index.setdefault(t, i)
        self.special = {t: i for i, t in enumerate(self.tokens) if self.types[i] in (TT_CONTROL, TT_UNKNOWN)}

    def __len__(self):
        return len(self.tokens)

    # ---- encoding --------------------------------------------------------

    def _spm(self, text, out):
        """llm_tokenizer_spm on one escaped fragment, appending ids to out."""
        b = text.encode("utf-8")
        # Symbols: byte ranges of UTF-8 characters, in a linked list.
        starts, lens = [], []
        i = 0
        while i < len(b):
            c = b[i]
            n = 1 if c < 0x80 else 2 if c >> 5 == 0x6 else 3 if c >> 4 == 0xE else 4 if c >> 3 == 0x1E else 1
            n = min(n, len(b) - i)
            starts.append(i)
            lens.append(n)
            i += n
        ns = len(starts)
        prev = list(range(-1, ns - 1))
        nxt = list(range(1, ns + 1))
        if ns:
            nxt[-1] = -1
        heap = []
        rev_merge = {}
        counter = 0

        def add_bigram(left, right):
            nonlocal counter
            if left == -1 or right == -1:
                return
            s = b[starts[left]:starts[left] + lens[left] + lens[right]]
            tid = self.index.get(s.decode("utf-8", "surrogateescape"))
            if tid is None:
                return
            heapq.heappush(heap, (-self.scores[tid], left, counter, right, len(s)))
            counter += 1
            rev_merge[s] = (left, right)

        for k in range(1, ns):
            add_bigram(k - 1, k)
        while heap:
            _, left, _, right, size = heapq.heappop(heap)
            if lens[left] == 0 or lens[right] == 0 or lens[left] + lens[right] != size:
                continue
            lens[left] += lens[right]
            lens[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])

        def resegment(k):
            # As llama.cpp: a symbol's text is a token, or the pair that
            # formed it is split again (with the halves' current lengths),
            # or it is written as bytes. Every merge forms a token, so in
            # practice only single characters missing from the vocabulary
            # reach the byte fallback.
            s = b[starts[k]:starts[k] + lens[k]]
            tid = self.index.get(s.decode("utf-8", "surrogateescape"))
            if tid is not None:
                out.append(tid)
                return
            m = rev_merge.get(s)
            if m is None:
                for byte in s:
                    out.append(BYTE0 + byte)
                return
            resegment(m[0])
            resegment(m[1])

        k = 0 if ns else -1
        while k != -1:
            resegment(k)
            k = nxt[k]

    def encode(self, text, add_bos=False, parse_special=True):
        """Token ids of text, as llama_tokenize(text, add_special=add_bos,
        parse_special) on a SentencePiece vocab with add_space_prefix."""
        out = [BOS] if add_bos else []
        frags = [text]
        if parse_special and self.special:
            pat = "(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")"
            frags = re.split(pat, text)
        prev_special = True
        for i, f in enumerate(frags):
            if parse_special and i % 2 == 1:
                out.append(self.special[f])
                prev_special = True
                continue
            if not f:
                continue
            self._spm(_escape((" " if prev_special else "") + f), out)
            prev_special = False
        return out

    # ---- decoding --------------------------------------------------------

    def piece_bytes(self, tid):
        """The bytes a token prints as (llama_token_to_piece, special=False)."""
        t = self.types[tid]
        if t == TT_BYTE:
            return bytes([tid - BYTE0])
        if t in (TT_CONTROL, TT_UNKNOWN):
            return b""
        return self.tokens[tid].replace(SPACE, " ").encode("utf-8")

    def decode(self, ids):
        return b"".join(self.piece_bytes(i) for i in ids).decode("utf-8", "replace")


def build_vocab(corpus_texts):
    """The vocabulary for a corpus (an iterable of texts, each one a
    fragment that SPM gives a space prefix; counted for the frequency order
    of the words)."""
    counts = {}
    for text in corpus_texts:
        # Each corpus text is tokenized as a fragment of its own, so it gets
        # the space prefix.
        for w in word_pieces(" " + text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))
    word_set = set(words)
    prefixes = []
    seen = set()
    for w in words:
        for n in range(2, len(w)):
            p = w[:n]
            if p not in word_set and p not in seen:
                seen.add(p)
                prefixes.append(p)
    chars = [SPACE] + [c for c in string.printable if c.isprintable() and c != " "]
    chars = [c for c in chars if c not in word_set and c not in seen]

    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % i for i in range(N_BYTES)]
    scores = [0.0] * (3 + N_BYTES)
    types = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL] + [TT_BYTE] * N_BYTES
    for i, w in enumerate(words):
        tokens.append(w)
        scores.append(-1.0 - i)
        types.append(TT_NORMAL)
    for i, p in enumerate(prefixes):
        tokens.append(p)
        scores.append(-1000.0 - i)
        types.append(TT_NORMAL)
    for i, c in enumerate(chars):
        tokens.append(c)
        scores.append(-2000.0 - i)
        types.append(TT_NORMAL)
    assert len(words) < 999 and len(prefixes) < 999
    return Vocab(tokens, scores, types)


def scene_corpus():
    """Texts of the whole prompt layout for a few thousand scenes: the
    system part, the user parts and the answers. Used to build the
    vocabulary (and to check the tokenizer against the C one)."""
    import scenes  # tools/ must be on sys.path
    import numpy as np
    rng = np.random.default_rng(7)
    texts = [SYSTEM_PART]
    for seed in range(4000):
        sc = scenes.make_scene(seed)
        texts.append(scenes.CAPTION_PROMPT + USER_SUFFIX)
        texts.append(scenes.caption(sc))
        for qt in scenes.QA_TYPES:
            q, a = scenes.make_question(sc, qt, rng)
            texts.append(q + USER_SUFFIX)
            texts.append(a)
    return texts


def default_vocab():
    """The vocabulary of the bundled model (deterministic)."""
    return build_vocab(scene_corpus())

#!/usr/bin/env python3
"""Reference side of the tokenizer tests: the sentencepiece and tokenizers libraries.

    tokenize_ref.py spm-train OUT.model            train a small BPE model (byte fallback, user symbols)
    tokenize_ref.py spm MODEL FIXTURE N SEED        N generated strings, the library's ids and decodes
    tokenize_ref.py hf-build STYLE OUT.json         a byte-level BPE tokenizer.json: gpt2, llama3, smollm2, qwen2
    tokenize_ref.py hf TOKENIZER.json FIXTURE N SEED
    tokenize_ref.py spm-time MODEL TEXT IDS.bin     time the library on a text file: prints "tokens seconds",
    tokenize_ref.py hf-time TOKENIZER.json TEXT IDS.bin  writes the ids (int32 little-endian) to IDS.bin

A fixture is binary: "TKFX", version 1 (u32), case count (u32), then per case
u32 text length + UTF-8 text, u32 id count + int32 ids, u32 decoded length + decoded text
(all little-endian). Exit status 3 means the reference library is not installed.
"""
import random
import struct
import sys
import time

LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")

WORDS = ("the of and to in is was he that it for on with as his at by be had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people Mr how too little state good very make "
         "world still own see men work long get here between both life being under never day same another know "
         "Elizabeth Darcy Bennet Longbourn Netherfield tokenizer LongLoRA attention context").split()
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "--", "?!", "''", "\u2014", "\u00ab", "\u00bb",
                                                      "\u201c", "\u201d", "\u2019", "\u00bf", "\u00a1"]
ACCENTED = ["caf\u00e9", "na\u00efve", "F\u00fchrer", "se\u00f1or", "\u00e5ngstr\u00f6m", "gar\u00e7on", "\u00c9cole",
            "cre\u0300me", "e\u0301", "\u0141\u00f3d\u017a", "\u0130stanbul", "stra\u00dfe", "\u00d8resund",
            "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5", "\u041f\u0440\u0438\u0432\u0435\u0442",
            "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd", "\u0928\u092e\u0938\u094d\u0924\u0947",
            "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "A\u030a", "\u212b", "\u1100\u1161\u11a8", "\uac00\u11a8",
            "e\u0301\u0327", "A\u0323\u0302", "\u1e9b\u0323", "\u0dd9\u0dcf\u0dca", "\u0344", "\u2126"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL", "'D", "'x", "'",
                "'\u017f", "'\u212a"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t ", "\u00a0", "\u3000", "\u2009",
          "\u2028", "\u0085", "\u000b", "\u000c", "\u200b", "\u1680", "\u202f", "\u205f"]
CONTROLS = [chr(c) for c in list(range(0, 9)) + list(range(14, 32)) + [0x7f, 0x80, 0x9f, 0xad, 0x200d, 0xfeff]]
NUMBERS = ["\u0663\u0664", "\u00bd", "\u2167", "\u00b2", "\u2460", "\u0969", "\uff11\uff12", "\U0001d7d9"]


def rand_cp(rng, lo, hi):
    while True:
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def fragment(rng, specials):
    k = rng.randrange(14)
    if k == 0:
        return rng.choice(WORDS)
    if k == 1:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    if k == 2:
        return rng.choice(SPACES) * rng.randint(1, 3)
    if k == 3:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
    if k == 4:
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 4)))
    if k == 5:
        return rng.choice(ACCENTED)
    if k == 6:  # CJK, kana, hangul
        lo, hi = rng.choice([(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x3400, 0x4DBF)])
        return "".join(rand_cp(rng, lo, hi) for _ in range(rng.randint(1, 6)))
    if k == 7:  # emoji, with modifiers and joiners
        e = "".join(rand_cp(rng, 0x1F300, 0x1FAFF) for _ in range(rng.randint(1, 3)))
        return rng.choice([e, e + "\u200d" + rand_cp(rng, 0x1F600, 0x1F64F), e + "\U0001F3FD", "\u2764\ufe0f", "\U0001F999"])
    if k == 8:
        return "".join(rng.choice(CONTROLS) for _ in range(rng.randint(1, 3)))
    if k == 9:
        return rng.choice(WORDS) + rng.choice(CONTRACTIONS)
    if k == 10:
        return rng.choice(NUMBERS)
    if k == 11:  # anything in the BMP or beyond
        return "".join(rand_cp(rng, 0x80, rng.choice([0x7FF, 0xFFFF, 0x2FFFF])) for _ in range(rng.randint(1, 4)))
    if k == 12 and specials:
        s = rng.choice(specials)
        return rng.choice(["", " ", "  ", "\n"]) + s + rng.choice(["", " ", "  ", "x"])
    return rng.choice(WORDS).upper() + rng.choice(["", ".", ",", "!", "?"])


def gen_strings(n, seed, specials=()):
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "a", "Hello world", " Hello world", "Hello World!", "1234567", "\u00bd", "\U0001F999.cpp",
           "don't you'll I'M", "he'\u017fx she'Sy it'REd", "   leading", "trailing   ", "a  b   c", "<s>", "</s>", "<unk>", "<0x41>"]
    out += list(specials)
    while len(out) < n:
        r = rng.random()
        if r < 0.02:  # long strings
            parts = [fragment(rng, specials) for _ in range(rng.randint(200, 600))]
        else:
            parts = [fragment(rng, specials) for _ in range(rng.randint(1, 12))]
        sep = rng.choice(["", " ", " ", " ", "\n", ""])
        out.append(sep.join(parts))
    return out[:n]


def write_fixture(path, cases):
    with open(path, "wb") as f:
        f.write(b"TKFX" + struct.pack("<II", 1, len(cases)))
        for text, ids, dec in cases:
            tb, db = text.encode("utf-8"), dec.encode("utf-8")
            f.write(struct.pack("<I", len(tb)) + tb)
            f.write(struct.pack("<I", len(ids)) + struct.pack(f"<{len(ids)}i", *ids))
            f.write(struct.pack("<I", len(db)) + db)


def need(module):
    try:
        return __import__(module)
    except ImportError:
        print(f"the Python library '{module}' is not installed for {sys.executable}")
        sys.exit(3)


def spm_train(out_model):
    spm = need("sentencepiece")
    rng = random.Random(7)
    corpus = [s for s in gen_strings(3000, 11) if len(s) < 200]
    corpus += [" ".join(rng.choice(WORDS + ACCENTED + PUNCT) for _ in range(12)) for _ in range(20000)]
    corpus = [c.replace("\n", " ") for c in corpus if c.strip()]
    prefix = out_model[:-len(".model")] if out_model.endswith(".model") else out_model
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, model_type="bpe",
                                   vocab_size=2000, byte_fallback=True, character_coverage=0.98,
                                   normalization_rule_name="identity", user_defined_symbols=["<sep>", "LongLoRA"],
                                   split_digits=True, minloglevel=2)


def spm_fixture(model, path, n, seed):
    spm = need("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=model)
    cases = []
    # user-defined and control pieces written as text: only user-defined ones are matched whole
    for s in gen_strings(n, seed, ["<sep>", "LongLoRA", "<s>", "</s>", "<unk>", "<0x41>"]):
        ids = sp.encode(s)
        cases.append((s, ids, sp.decode(ids)))
    write_fixture(path, cases)
    print(f"{len(cases)} strings encoded by sentencepiece {spm.__version__}")


def hf_build(style, out):
    tk = need("tokenizers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, trainers, processors, Regex, AddedToken
    specials = {"gpt2": ["<|endoftext|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"],
                "smollm2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[style]
    tok = Tokenizer(models.BPE(ignore_merges=(style == "llama3")))
    bl = pre_tokenizers.ByteLevel
    if style == "gpt2":
        tok.pre_tokenizer = bl(add_prefix_space=False)
    elif style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated"),
                                                     bl(add_prefix_space=False, use_regex=False)])
    elif style == "smollm2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     bl(add_prefix_space=False, use_regex=True)])
    else:  # Qwen2 also normalizes to NFC
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
                                                     bl(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(5)
    corpus = gen_strings(3000, 21) + [" ".join(rng.choice(WORDS) for _ in range(15)) for _ in range(3000)]
    trainer = trainers.BpeTrainer(vocab_size=2500, initial_alphabet=bl.alphabet(), special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    if style == "qwen2":  # added tokens with options, one of them not special
        tok.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True, special=False),
                        AddedToken("wordy", single_word=True, special=False)])
    tok.save(out)
    if style == "gpt2":  # the older "left right" string form of merges
        import json
        j = json.load(open(out, encoding="utf-8"))
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
        json.dump(j, open(out, "w", encoding="utf-8"), ensure_ascii=False)


def hf_fixture(path_json, path, n, seed):
    tk = need("tokenizers")
    tok = tk.Tokenizer.from_file(path_json)
    specials = [t.content for t in tok.get_added_tokens_decoder().values()]
    cases = []
    for s in gen_strings(n, seed, specials):
        ids = tok.encode(s, add_special_tokens=False).ids
        cases.append((s, ids, tok.decode(ids, skip_special_tokens=False)))
    write_fixture(path, cases)
    print(f"{len(cases)} strings encoded by tokenizers {tk.__version__}")


def time_encode(encode, text_path, ids_path):
    text = open(text_path, encoding="utf-8", newline="").read()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        ids = encode(text)
        best = min(best, time.perf_counter() - t0)
    with open(ids_path, "wb") as f:
        f.write(struct.pack(f"<{len(ids)}i", *ids))
    print(f"{len(ids)} {best:.6f}")


def spm_time(model, text_path, ids_path):
    spm = need("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=model)
    time_encode(sp.encode, text_path, ids_path)


def hf_time(path_json, text_path, ids_path):
    tk = need("tokenizers")
    tok = tk.Tokenizer.from_file(path_json)
    time_encode(lambda s: tok.encode(s, add_special_tokens=False).ids, text_path, ids_path)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd = argv[1]
    if cmd == "spm-train":
        spm_train(argv[2])
    elif cmd == "spm":
        spm_fixture(argv[2], argv[3], int(argv[4]), int(argv[5]))
    elif cmd == "hf-build":
        hf_build(argv[2], argv[3])
    elif cmd == "hf":
        hf_fixture(argv[2], argv[3], int(argv[4]), int(argv[5]))
    elif cmd == "spm-time":
        spm_time(argv[2], argv[3], argv[4])
    elif cmd == "hf-time":
        hf_time(argv[2], argv[3], argv[4])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

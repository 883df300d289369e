"""python -m train.tokenize [--corpus PATH] [--output DIR] [--vocab_size N | --tokenizer FILE]

Trains a byte-level BPE tokenizer on a local corpus's training documents (or takes a Hugging Face
tokenizer.json), tokenises every document into array_record shards in parallel, and writes
tokenizer.json and metadata.json beside them (train/data/tokens.py has the layout). Without
--corpus: the Python standard library's sources, as the byte LM; nothing is downloaded.
Without --output: DATA_DIR/memzoo_tokens/tokens_<fingerprint>, where `python -m train` with
data.task=tokens and the same settings looks. Rerunning with the same settings reuses the output;
other settings or a changed corpus are refused unless --overwrite. Then train on it:

    python -m train --preset lm_tiny_tokens --set data.task_options='{"dir": "DIR"}'
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from train.data import tokens
    parser = argparse.ArgumentParser(prog="python -m train.tokenize",
                                     description=__doc__.split("\n\n")[1],
                                     epilog="then:\n" + __doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus = parser.add_argument_group("corpus")
    corpus.add_argument("--corpus", help="a text file or a directory of them (default: the Python "
                        "standard library's *.py)")
    corpus.add_argument("--pattern", help="glob of the corpus files under a directory (default "
                        "**/* ; **/*.py for the default corpus)")
    corpus.add_argument("--document_separator", help="cut files into documents at this string "
                        "(default: one document per file); e.g. $'\\n\\n\\n' in bash")
    corpus.add_argument("--validation_fraction", type=float, default=0.05)
    corpus.add_argument("--test_fraction", type=float, default=0.05)
    corpus.add_argument("--seed", type=int, default=0, help="the document split's hash seed "
                        "(data_seed in train.data.build)")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (byte-level BPE) to use "
                     "instead of training one")
    tok.add_argument("--vocab_size", type=int, default=tokens.DEFAULT_VOCAB_SIZE,
                     help="ids of the trained tokenizer, specials included (default %(default)s)")
    tok.add_argument("--min_frequency", type=int, default=2,
                     help="a merge must be seen this often (default %(default)s)")
    tok.add_argument("--tokenizer_sample_mb", type=float, default=tokens.DEFAULT_SAMPLE_MB,
                     help="MB of training documents the merges are learned from, spread over the "
                          "corpus (default %(default)s)")
    for role, default in (("pad", tokens.PAD_TOKEN), ("bos", tokens.BOS_TOKEN),
                          ("eos", tokens.EOS_TOKEN)):
        tok.add_argument(f"--{role}_token", default=default,
                         help=f"special token for {role.upper()} (added to a given tokenizer "
                              f"that lacks it; default %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", help="output directory (default: DATA_DIR/memzoo_tokens/"
                     "tokens_<fingerprint>)")
    out.add_argument("--data_dir", help="DATA_DIR (default $MEMZOO_DATA_DIR or "
                     "~/tensorflow_datasets)")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="tokenising processes (default: the CPU count, %(default)s)")
    out.add_argument("--num_shards", type=int, help="groups of files, one shard per split each "
                     "(default: 16, or ~256 MB of text each for larger corpora)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an output of other settings or another corpus")
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from train.data import builders, tokens
    try:
        p = tokens.plan(corpus=args.corpus, pattern=args.pattern, tokenizer=args.tokenizer,
                        vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                        tokenizer_sample_mb=args.tokenizer_sample_mb, seed=args.seed,
                        validation_fraction=args.validation_fraction,
                        test_fraction=args.test_fraction,
                        document_separator=args.document_separator, pad_token=args.pad_token,
                        bos_token=args.bos_token, eos_token=args.eos_token)
        output = args.output or tokens.auto_dir(args.data_dir or builders.default_data_dir(), p)
        output = tokens.prepare(output, p, workers=args.workers, num_shards=args.num_shards,
                                overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, OSError) as err:
        print(f"python -m train.tokenize: error: {err}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Core: what every layer needs and that knows nothing of the pipeline's stages.

    settings.py   Settings: the data home, broker, topics, archive location (flags > KLONG_* env > defaults)
    procs.py      child processes: pid checks, supervised runs, fsync helpers
    objstore.py   where the archive lives: a local directory or an S3 prefix
    chat.py       chat messages -> the exact token ids of a model directory's chat template
    tokenize.py   tokenizers for text-only steps (bytes, tokenizer.json, a chat template)
    aliases.py    the old import paths of moved modules (klong.settings, store.ui, ...), kept for one release;
                  `python -m core.aliases FILE...` rewrites them to the new ones
"""

"""`klong model import`: a GGUF file or a local transformers directory -> HOME/models/NAME.

    klong model import SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2      # prints HOME/models/smollm2
    klong model import path/to/hf-model --name mine --chat-template tools.jinja

The result is a transformers directory (float32 safetensors for a GGUF file, config, tokenizer.json,
tokenizer_config.json) with a tool-aware chat template in chat_template.jinja: pass the directory (or
NAME) wherever a model is expected (`model.name=`, `tokenizer=`, `--tokenizer`, vLLM `--model` and
`--chat-template DIR/chat_template.jinja`). The library is `trainer.model_import`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_model_import(args) -> int:
    from core.settings import Settings
    from trainer.model_import import import_model

    settings = Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)
    path = import_model(args.source, args.name, settings.home / "models",
                        chat_template=Path(args.chat_template) if args.chat_template else None, force=args.force)
    print(path)
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("model", parents=[common], help="import a model (GGUF file or transformers directory)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = what.add_parser("import", parents=[common], description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="convert a .gguf file (dequantized to float32) or copy a transformers directory "
                             "to HOME/models/NAME, with a tool-aware chat template; prints the path")
    i.add_argument("source", help="a .gguf file or a local transformers model directory (config.json, weights, "
                                  "tokenizer files); nothing is downloaded")
    i.add_argument("--name", required=True, help="directory name under HOME/models")
    i.add_argument("--chat-template", metavar="FILE",
                   help="install this Jinja chat template instead (default: the model's own if it renders "
                        "tools, else ChatML with Hermes-style tools, trainer/templates/chatml_tools.jinja)")
    i.add_argument("--force", action="store_true", help="replace an existing HOME/models/NAME")
    i.set_defaults(func=cmd_model_import)

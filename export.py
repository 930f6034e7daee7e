"""Export a jaxgpt checkpoint to a Hugging Face GPT-2 directory (transformers can load it).

    python export.py --out_dir=out-shakespeare-char-cpu --hf_dir=hf-shakespeare-char
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf-shakespeare-char')"

--which=latest exports the latest checkpoint instead of the best one. A BPE model's directory
also gets vocab.json and merges.txt; a char model's gets jaxgpt_tokenizer.json (Hugging Face
has no character tokenizer for GPT-2).
"""

import sys
from dataclasses import dataclass

from jaxgpt.checkpoint import load_model
from jaxgpt.config import UserError, check_choice, parse_args, run_cli
from jaxgpt.pretrained import export_hf


@dataclass
class ExportConfig:
    out_dir: str = "out"
    hf_dir: str = ""  # where to write the Hugging Face directory
    which: str = "best"  # 'best' | 'latest'


def export_main(argv) -> int:
    ec = parse_args(argv, ExportConfig)
    check_choice("which", ec.which, ("best", "latest"))
    if not ec.hf_dir:
        raise UserError("pass --hf_dir=DIR, the directory to write the Hugging Face GPT-2 files to")
    _, params, model_cfg, tok, meta = load_model(ec.out_dir, ec.which)
    export_hf(params, model_cfg, ec.hf_dir, tok)
    print(f"exported {ec.out_dir} (iter {meta['step']}) to {ec.hf_dir}")
    return 0


def main(argv):
    return run_cli(export_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

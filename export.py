"""Export a jaxgpt checkpoint to a Hugging Face GPT-2 directory (transformers can load it), and/or
to a standalone jaxgpt out_dir. A LoRA run is exported with its adapters merged into the weights;
a QLoRA run with its adapters merged into the dequantized base (the model it trained), and the
export says that it was trained against a quantized base (printed, in the Hugging Face
config.json as "jaxgpt_qlora_base", in the jaxgpt out_dir's checkpoint metadata as "qlora_base").

    python export.py --out_dir=out-shakespeare-char-cpu --hf_dir=hf-shakespeare-char
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf-shakespeare-char')"
    python export.py --out_dir=out-code-lora --jaxgpt_dir=out-code-merged    # no base needed after this
    python export.py --init_from=out-shakespeare-char/ckpt.pt --hf_dir=hf-char   # nanoGPT's (+ its meta.pkl)

--which=latest exports the latest checkpoint instead of the best one. --init_from=SOURCE exports
weights from elsewhere instead of the out_dir's run (what sample.py's --init_from takes: a nanoGPT
ckpt.pt, with --meta_pkl=PATH where its meta.pkl is not found, a Hugging Face directory, a GPT-2
name) to --hf_dir. A BPE model's directory also gets vocab.json and merges.txt; a char model's gets
jaxgpt_tokenizer.json (Hugging Face has no character tokenizer for GPT-2), which jaxgpt reads back:
the directory is a round trip for init_from and sample.py. Each directory is written into a temporary sibling and
renamed into place when whole, so Ctrl-C or a full disk never leaves half an export; a directory
that holds files is replaced only with --overwrite=True (never the run being exported).
"""

import os
import sys
from dataclasses import dataclass

from jaxgpt.config import ANY, choice, group, nonempty, parse_args, validate_fields
from jaxgpt.cli import run_cli
from jaxgpt.errors import UserError
from jaxgpt.parallel import launched_index
from jaxgpt.pretrained import export_hf
from jaxgpt.loading import load, quantized_base, save_standalone
from jaxgpt.rundir import check_output_dir, replace_dir


_export = group("export")


@dataclass(frozen=True)
class ExportConfig:
    """Exports a jaxgpt run to a Hugging Face GPT-2 directory and/or a standalone jaxgpt out_dir (a LoRA or
    QLoRA run with its adapters merged)."""

    out_dir: str = _export("out", nonempty("pass the run to export, e.g. --out_dir=out"), "the run to export")
    init_from: str = _export("resume", nonempty("use resume (the out_dir's run) or the weights to export"),
                             "resume = the out_dir's run; or weights as sample.py takes them (--hf_dir only)")
    meta_pkl: str = _export("", ANY, "init_from a nanoGPT character ckpt.pt: its meta.pkl (default: beside it, else "
                                     "data/<its dataset>/meta.pkl)")
    hf_dir: str = _export("", ANY, "where to write the Hugging Face directory")
    jaxgpt_dir: str = _export("", ANY, "where to write a standalone jaxgpt out_dir (no base needed after it)")
    which: str = _export("best", choice("best", "latest"), "the run's best checkpoint or its latest")
    overwrite: bool = _export(False, None, "replace a --hf_dir / --jaxgpt_dir that already holds files")


def export_main(argv) -> int:
    if launched_index() > 0:  # started as a job of several processes: process 0 exports (and reports) alone
        return 0
    ec = parse_args(argv, ExportConfig)
    validate_fields(ec)
    if not (ec.hf_dir or ec.jaxgpt_dir):
        raise UserError("pass --hf_dir=DIR (a Hugging Face GPT-2 directory) and/or --jaxgpt_dir=DIR (a jaxgpt out_dir)")
    if ec.hf_dir and ec.jaxgpt_dir and os.path.realpath(ec.hf_dir) == os.path.realpath(ec.jaxgpt_dir):
        raise UserError(f"--hf_dir and --jaxgpt_dir are both {ec.hf_dir}; give them different directories")
    resume = ec.init_from == "resume"
    if ec.jaxgpt_dir and not resume:
        raise UserError(f"--jaxgpt_dir exports a jaxgpt run; to make one from {ec.init_from}, run train.py with "
                        f"--init_from={ec.init_from} (--max_iters=0 writes its first checkpoint)")
    source = ec.out_dir if resume else ec.init_from
    for flag in ("jaxgpt_dir", "hf_dir"):  # checked before any work: nothing is loaded or written otherwise
        check_output_dir(flag, getattr(ec, flag), ec.overwrite, protect=(source,))
    # LoRA adapters come merged
    _, params, model_cfg, tok, meta = load(source, ec.which, run=resume, meta_pkl=ec.meta_pkl)
    what = f"{source} (iter {meta['step']})" if "step" in meta else source
    qbase = quantized_base(meta)
    if qbase:
        print(f"note: {ec.out_dir} was trained against a {qbase['quant']}-quantized base ({qbase['source']}); "
              f"the export is its adapters merged into that base dequantized, in float32")
    if ec.jaxgpt_dir:
        with replace_dir(ec.jaxgpt_dir, "the exported run") as tmp:
            save_standalone(tmp, params, model_cfg, meta, name=ec.jaxgpt_dir)
        print(f"exported {what} to the jaxgpt out_dir {ec.jaxgpt_dir}")
    if ec.hf_dir:
        with replace_dir(ec.hf_dir, "the Hugging Face directory") as tmp:
            export_hf(params, model_cfg, tmp, tok, extra_config={"jaxgpt_qlora_base": qbase} if qbase else None)
        print(f"exported {what} to the Hugging Face directory {ec.hf_dir}")
    return 0


def main(argv):
    return run_cli(export_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""QLoRA-finetune GPT-2-medium on your own code: LoRA adapters over a frozen base whose Linear
kernels are stored in NF4 (4.5 bits per weight), quantized one tensor at a time as they load.

    python train.py --config configs/finetune_code_qlora.py --input_file=path/to/your/repo
    python sample.py --out_dir=out-code-qlora --start="def " --temperature=0.7
    python export.py --out_dir=out-code-qlora --hf_dir=gpt2-medium-code   # merged, float32

Offline (no OpenAI weights here): a random GPT-2-medium-shaped directory works the same way:
    python scripts/random_gpt2.py --size=gpt2-medium --out=gpt2-medium-random
    python train.py --config configs/finetune_code_qlora.py --init_from=gpt2-medium-random \
        --data_dir=data/code-bytes --input_file=.

The same settings as configs/finetune_code_lora.py except where noted: the larger model is the
point of QLoRA, and the step is smaller.
"""
out_dir = "out-code-qlora"
init_from = "gpt2-medium"  # 355M: 3x GPT-2 124M; gpt2-large and gpt2-xl work the same way
finetune_method = "qlora"
qlora_quant = "nf4"  # 'int8': 2x the base's bytes, 10x less quantization error
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05

dataset = "code_qlora"  # its own data/code_qlora: another base may bring another tokenizer
tokenizer = "gpt2"
include = "**/*.py"
exclude = "venv/**,**/site-packages/**,build/**,data/**"

block_size = 256  # half of finetune_code_lora.py's 512, 4 x 256 tokens a step without accumulation:
batch_size = 4  # about 45 s a step on a 2-core CPU (README), far less on a GPU
gradient_accumulation_steps = 1

max_iters = 200
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 10
lr_decay_iters = 200
weight_decay = 0.0
eval_interval = 50
eval_iters = 10
log_interval = 10

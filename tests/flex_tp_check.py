"""Run under torchrun by test_parallel: a model with FlexAttention, tensor-parallel (with and without sequence
parallel), gives the logits of the single-process SDPA model. Each rank's ALiBi score modification indexes its
own slice of the slopes. Forward only: torch has no CPU backward for FlexAttention."""

import torch
import torch.distributed as dist

from bigscience_train.model.gpt import GPT, build_on_meta, materialize
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.env import init_parallel
from bigscience_train.parallel.tensor import apply_tensor_parallel

penv = init_parallel(ParallelDims(tp=2))
shape = GPTShape(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=256)
tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    expected = GPT(shape, seed=0).eval()(tokens)
    for sequence_parallel in (False, True):
        model = materialize(build_on_meta(GPTShape(**{**shape.__dict__, "attention": "flex"})), "cpu", 0)
        apply_tensor_parallel(model.eval(), penv.mesh["tp"], sequence_parallel)
        logits = model(tokens).full_tensor()
        error = (logits - expected).abs().max().item()
        assert error < 1e-5, f"sequence_parallel={sequence_parallel}: max error {error}"
if penv.is_rank0:
    print("flex tensor-parallel logits match")
dist.destroy_process_group()

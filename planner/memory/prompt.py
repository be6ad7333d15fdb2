"""Prompt tuning (``--peft-type prompt_tuning``, ``planner.model.prompt``): what PEFT's prompt adds to a step.

The model runs on ``s = seq_len + n`` positions per row (``TrainingSettings.shape``), so every term of the frozen
model is the usual one at that length, with layer 0's input needing a gradient (the prompt trains: layer 0 is no
``first`` layer). What PEFT's own forward (``PeftModelForCausalLM.forward``, PEFT 0.21) adds is here, derived from
its code and checked against the traced step (tests/planner/test_prompt_tuning.py). Notation as in
``planner.memory.terms``; ``rows`` terms count per row of the batch (``Lin``). Torch-free.
"""

from __future__ import annotations

from qplan.planner.memory.lin import Lin, Precision
from qplan.planner.memory.terms import Dims


def prompt_batch_correction(n: int) -> Lin:
    """The batch the Trainer holds is ``b × seq_len`` (``input_ids``, ``labels``: int64), not ``b × s``: the batch
    term (``16`` per token, ``head_activation``) counted at ``s`` is ``16 n`` per row too many."""
    return Lin(rows=-16 * n)


def prompt_input_saved(d: Dims, p: Precision, ckpt: bool) -> Lin:
    """The model's input, ``inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)`` (``R h`` per token), is
    saved for backward when nothing else counts it: without checkpointing, in fp32 (``R = 4``: layer 0's RMSNorm
    ``hidden_states.to(torch.float32)`` returns the tensor itself, which ``pow`` saves) — until layer 0's backward.
    With checkpointing it is layer 0's checkpointed input, counted with the others; in 16 bits the norm saves its
    fp32 copy (the layer's own term)."""
    return Lin(tok=p.R * d.h) if (not ckpt and p.R == 4) else Lin()


def prompt_forward_activation(d: Dims, p: Precision, n: int, ckpt: bool) -> Lin:
    """Alive until PEFT's forward returns, after the loss (its locals): the model's input (``R h`` per token, unless
    saved for backward anyway: a checkpoint's input, or ``prompt_input_saved``); ``prompts`` cast to the embeddings'
    dtype (``R h n`` per row; the fp32 embedding output it was cast from is gone); the labels with ``-100`` prepended
    (``torch.cat((prefix_labels, labels))``, int64: ``8`` per token) and ``prefix_labels`` itself (``8 n`` per row)."""
    model_input = 0 if (ckpt or p.R == 4) else p.R * d.h
    return Lin(tok=model_input + 8, rows=(p.R * d.h + 8) * n)


def prompt_checkpoint_leaf(d: Dims, p: Precision, n: int) -> Lin:
    """With checkpointing, PEFT's ``enable_input_require_grads`` hook (``output.requires_grad_(True)`` on the word
    embeddings, whose weight is frozen) makes their output a leaf that requires grad. The ``cat`` feeding the model
    reaches it through an ``AccumulateGrad`` node, which holds the leaf until the backward frees the graph: the word
    embeddings of the ``b × seq_len`` tokens, ``R h`` per token less ``R h n`` per row, alive from the forward to the
    end of the backward."""
    return Lin(tok=p.R * d.h, rows=-p.R * d.h * n)


def prompt_encoder_saved(p: Precision, n: int, mlp: list[tuple[int, int]]) -> Lin:
    """P-tuning's MLP (``planner.model.prompt.PTuningSettings``), saved from its forward until its backward, the
    last of the step. PEFT runs it once, on one row of the ``n`` virtual tokens (``get_prompt``: ``prompt_tokens[:1]``,
    the output expanded to the batch), so nothing here grows with the batch (``const``). Each ``Linear`` saves its
    input for its weight gradient — the embedding's output, then each ``ReLU``'s output (which the ``ReLU`` saves for
    its own backward too: the same tensor): ``e n (h + H + H)``, ``e`` the encoder's compute bytes (4: its fp32
    weights, without autocast; ``c`` under autocast, whose casts of the inputs are the saved tensors); under autocast
    also the cached ``c``-byte copies of its weights, which its input gradients need (``mlp``: ``(in, out)`` per
    layer)."""
    e = p.c if p.amp else 4
    act = e * n * (mlp[0][0] + sum(out for _, out in mlp[:-1]))
    casts = p.c * sum(i * o for i, o in mlp) if p.amp else 0
    return Lin(const=act + casts)

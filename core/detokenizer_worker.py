"""The detokenizer process of `--detokenizer process` (SGLang's DetokenizerManager layout):
`python -m pegboard.core.detokenizer_worker --model-dir DIR --in-fd R --out-fd W`.

It owns the tokenizer and every request's incremental detokenizer (`DetokenizerStates`, keyed
by a slot number the engine's process gives each request). Per engine step it reads one message
of token ids and answers with one message of text deltas and events (stop strings, tokenizer
errors); `pegboard.core.detokenizer_process` is the other end.

Wire format (pickled tuples over two pipes, one message per step each way, after a first
`READY` from the process once its tokenizer is loaded):
  in:  (new, heads, tokens): `new` lists (slot, skip_special_tokens, stop strings, the prompt's
       last tokens, output kind) of the requests seen for the first time; `heads` is flat
       (slot, number of tokens, flags) per delta (flags: 1 finished, 2 finished on a token:
       flush the held text; slot -1: a delta without a request); `tokens` is every delta's
       token ids, concatenated.
       An empty message asks the process to exit.
  out: (texts, events, picks): the deltas to deliver, one text each, and (index into `texts`,
       event, value) for those not delivered as they are (`pegboard.core.detokenizer_states`);
       `picks` is None when every delta is delivered (then `texts` has one per delta), else
       the indices of the delivered ones: a "final" request's deltas before its end are left
       out here, so a step of such requests costs the engine's process nothing per request.

It ignores SIGINT and SIGTERM (a draining server still needs its text) and exits when its
input pipe closes: the engine closed it, or the engine's process is gone.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import signal
from multiprocessing.connection import Connection

from pegboard.core.detokenizer import PROMPT_CONTEXT_TOKENS
from pegboard.core.detokenizer_states import HELD, DetokenizerStates
from pegboard.sdk.types import SamplingParams

FINISHED = 1
FLUSH = 2
READY = b"ready"  # its first message, once the tokenizer is loaded


def encode_step(new: list, heads: list[int], tokens: list[int]) -> bytes:
    return pickle.dumps((new, heads, tokens), protocol=pickle.HIGHEST_PROTOCOL)


def new_request(slot: int, request) -> tuple:
    """The record that opens a request's state in the detokenizer process."""
    p = request.params
    context = request.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
    return slot, p.skip_special_tokens, p.stop, context, p.output_kind


def detokenize_step(states: DetokenizerStates, opening: dict, message: bytes) -> bytes:
    """Answer one step's message (see the module docstring)."""
    new, heads, tokens = pickle.loads(message)
    for slot, skip_special_tokens, stop, context, kind in new:
        params = SamplingParams(
            stop=list(stop), skip_special_tokens=skip_special_tokens, output_kind=kind
        )
        opening[slot] = (params, context)
    texts, events, picks = [], [], []
    feed, pos = states.feed, 0
    for i in range(0, len(heads), 3):
        slot, n, flags = heads[i], heads[i + 1], heads[i + 2]
        ids = tokens[pos : pos + n]
        pos += n
        params, context = opening.pop(slot, None) or (None, None)
        text, event = feed(slot, ids, flags & FINISHED, flags & FLUSH, params, context)
        if event is not None:
            if event is HELD:
                continue
            events.append((len(texts), *event))
        texts.append(text)
        picks.append(i // 3)
    if len(picks) * 3 == len(heads):
        picks = None  # every delta: the engine's process takes them all, as they are
    return pickle.dumps((texts, events, picks), protocol=pickle.HIGHEST_PROTOCOL)


def serve(inbox: Connection, outbox: Connection, tokenizer) -> None:
    """Answer step messages until the input closes or an empty message arrives."""
    states, opening = DetokenizerStates(tokenizer), {}
    while True:
        try:
            message = inbox.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:
            return
        outbox.send_bytes(detokenize_step(states, opening, message))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--allow-missing", action="store_true", help="no tokenizer: token ids as text")
    p.add_argument("--in-fd", type=int, required=True)
    p.add_argument("--out-fd", type=int, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="pegboard detokenizer: %(message)s")
    from pegboard.core.tokenizer import load_tokenizer

    inbox = Connection(args.in_fd, writable=False)
    outbox = Connection(args.out_fd, readable=False)
    tokenizer = load_tokenizer(args.model_dir, allow_missing=args.allow_missing)
    try:
        outbox.send_bytes(READY)
        serve(inbox, outbox, tokenizer)
    except (BrokenPipeError, ConnectionResetError):  # the engine's process is gone
        pass


if __name__ == "__main__":
    main()

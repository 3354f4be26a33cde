"""An optional adapter exposing nl_jax models to lm-evaluation-harness (not a dependency).

    from nl_jax.eval.harness import make_lm
    lm = make_lm(runner, tokenizer, max_len=4096)
    import lm_eval; lm_eval.simple_evaluate(model=lm, tasks=["piqa", "hellaswag"])

`lm_eval` is imported only inside `make_lm`. The three request types map to this package:
loglikelihood -> `loglikelihood.loglikelihood` (same tokenization as lm-evaluation-harness),
loglikelihood_rolling -> perplexity's sliding windows over the whole string, generate_until ->
greedy decoding cut at the first stop string.
"""

from __future__ import annotations

import numpy as np

from nl_jax.eval import loglikelihood as ll_lib
from nl_jax.eval import perplexity as ppl
from nl_jax.eval.runner import ModelRunner


def loglikelihood_requests(runner, tokenizer, pairs, max_len):
    return ll_lib.loglikelihood(runner, tokenizer, pairs, max_len=max_len)


def rolling_requests(runner, tokenizer, texts, max_len):
    """Total log-likelihood of each whole string (disjoint windows of max_len)."""
    docs = [ppl.Document(np.asarray(tokenizer.encode(t), np.int32), 0, 0) for t in texts]
    nonempty = [i for i, d in enumerate(docs) if len(d.tokens)]
    lps = ppl.document_logprobs_sliding(
        runner, [docs[i] for i in nonempty], max_len, max_len, tokenizer.eos_id
    )
    out = [0.0] * len(texts)
    for i, lp in zip(nonempty, lps):
        out[i] = float(lp.sum())
    return out


def generate_requests(runner, tokenizer, requests, max_len, default_max_new_tokens=64):
    """Greedy text for each (context, {"until": [...], "max_gen_toks": n}) request."""
    outs = []
    for context, kwargs in requests:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n = int(kwargs.get("max_gen_toks", default_max_new_tokens))
        prompt = np.concatenate([[tokenizer.eos_id], tokenizer.encode(context)]).astype(np.int32)
        prompt = prompt[-max(1, max_len - n) :]
        text = tokenizer.decode(runner.generate(prompt[None], n)[0])
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        outs.append(text)
    return outs


def make_lm(runner: ModelRunner, tokenizer, *, max_len: int):
    """An `lm_eval.api.model.LM` over `runner`; raises ImportError if lm-evaluation-harness is
    not installed."""
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError(
            "lm-evaluation-harness is not installed (pip install lm-eval); nl_jax's own "
            "commonsense suite (experiments.evaluate --suite=commonsense) needs no extra package"
        ) from e

    class NlJaxLM(LM):
        def __init__(self):
            super().__init__()
            self.runner, self.tokenizer, self.max_len = runner, tokenizer, max_len

        def loglikelihood(self, requests):
            return loglikelihood_requests(
                self.runner, self.tokenizer, [r.args for r in requests], self.max_len
            )

        def loglikelihood_rolling(self, requests):
            return rolling_requests(self.runner, self.tokenizer, [r.args[0] for r in requests], self.max_len)

        def generate_until(self, requests):
            return generate_requests(self.runner, self.tokenizer, [r.args for r in requests], self.max_len)

    return NlJaxLM()

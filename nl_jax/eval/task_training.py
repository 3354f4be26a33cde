"""A fresh model of a run's configuration trained on one synthetic task, and its logits on the
task's test sequences: what the `mad` and `formal` suites do per task.

Both protocols train a model per task and score it on held-out sequences. The model, optimizer,
learning-rate schedule and state layout are the trainer's: `build_train_program` on a copy of the
run's config whose steps, batch and length are the task's. Only the loss differs from the trainer's
step, because the protocols score answer positions rather than every next token:

  "softmax"     cross entropy of the target token at positions of weight > 0 (MAD: the positions
                Poli et al. 2024, arXiv 2403.17844, mark as ignored have weight 0);
  "multilabel"  one sigmoid per class over `classes` (token ids, at most MAX_CLASSES), against a 0/1 target per class
                (formal languages: the set of symbols that may follow the prefix, the recognition
                objective of Bhattamishra et al. 2020, arXiv 2009.11264).

Sequences are padded after their tokens (causal models never see it; weight 0) to a multiple of
`LENGTH_BUCKET`, so a suite compiles one train step per length bucket and loss kind.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flax import nnx

from nl_jax.models import build_model
from nl_jax.train.program import build_train_program
from nl_jax.train.step import all_finite, token_nll

LENGTH_BUCKET = 64
MAX_CLASSES = 8  # multilabel: classes per task, at most
KINDS = ("softmax", "multilabel")


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Token sequences of one split. `targets`: int [N, T] (softmax) or 0/1 float [N, T, K]
    (multilabel); `weights`: float [N, T], 1 where the position is trained or scored."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(data: TaskData, length: int) -> TaskData:
    """`data` with its positions padded (weight 0) or kept to `length`."""
    t = data.inputs.shape[1]
    if t > length:
        raise ValueError(f"sequences of {t} tokens do not fit {length}")
    extra = [(0, 0), (0, length - t)]
    return TaskData(
        np.pad(data.inputs, extra).astype(np.int32),
        np.pad(data.targets, extra + [(0, 0)] * (data.targets.ndim - 2)),
        np.pad(data.weights, extra).astype(np.float32),
    )


def task_config(
    config,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float | None = None,
    weight_decay: float | None = None,
):
    """A copy of a run's config that trains its model for `steps` steps on batches of
    `batch_size` x `seq_len` tokens: the model section as it is, the optimizer with the warm-up cut
    to a tenth of the steps when it is longer (a schedule of a few steps would otherwise never reach
    its peak), and the peak learning rate `lr` and the decoupled weight decay `weight_decay`
    (`optim.weight_decay`, applied by nl_jax.optim.factory) when given (None: the run's)."""
    config = copy.deepcopy(config)
    config.train.update(steps=steps, grad_accum_steps=1)
    config.data.update(global_batch_size=batch_size, seq_len=seq_len, document_boundaries="ignore")
    config.optim.update(warmup_steps=min(int(config.optim.get("warmup_steps", 0)), steps // 10))
    if lr is not None:
        config.optim.update(lr=lr)
    if weight_decay is not None:
        config.optim.update(weight_decay=weight_decay)
    return config


def _loss(kind: str, logits, targets, weights, classes, class_weights):
    if kind == "softmax":
        per_position = token_nll(logits, targets)
    else:
        z = logits[..., classes].astype(jnp.float32)
        per_position = (optax.sigmoid_binary_cross_entropy(z, targets) * class_weights).sum(-1)
    return (per_position * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _class_args(classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`classes` padded to MAX_CLASSES (weight 0), so that every class set shares one program."""
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"at most {MAX_CLASSES} classes, got {len(classes)}")
    ids = np.zeros(MAX_CLASSES, np.int32)
    ids[: len(classes)] = classes
    return ids, (np.arange(MAX_CLASSES) < len(classes)).astype(np.float32)


class TaskTrainer:
    """Trains fresh models of `config` on the mesh at one learning rate and weight decay (None: the
    run's): one program per (length bucket, loss kind), reused by every task of that shape."""

    def __init__(
        self,
        config,
        mesh,
        *,
        steps: int,
        batch_size: int,
        lr: float | None = None,
        weight_decay: float | None = None,
    ):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.config, self.mesh, self.steps = config, mesh, steps
        self.lr, self.weight_decay = lr, weight_decay
        shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        self.batch_size = _round_up(batch_size, shards)  # every device gets whole rows
        self._programs: dict = {}
        self._forward: dict = {}

    def _program(self, length: int, kind: str):
        key = (length, kind)
        if key in self._programs:
            return self._programs[key]
        cfg = task_config(
            self.config,
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=length,
            lr=self.lr,
            weight_decay=self.weight_decay,
        )
        program = build_train_program(cfg, self.mesh)
        model, tx, schedule = program.model, program.tx, program.schedule

        def step(state, batch, classes, class_weights):
            def loss_fn(params):
                logits = model.apply(params, batch["inputs"])
                return _loss(kind, logits, batch["targets"], batch["weights"], classes, class_weights)

            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            new = {
                "step": state["step"] + 1,
                "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state,
            }
            # as the trainer's step: a non-finite update leaves the state as it was
            finite = jnp.isfinite(loss) & all_finite((new["params"], new["opt_state"]))
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
            return new, {"loss": loss, "finite": finite, "lr": schedule(state["step"])}

        def init(seed):
            # as the trainer's init_train_state, with the seed an argument: one compile per program
            # instead of one per task
            module = build_model(model.cfg, nnx.Rngs(jax.random.key(seed)))
            params = nnx.split(module, nnx.Param, ...)[1].to_pure_dict()
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

        rows, replicated = NamedSharding(self.mesh, P(("data", "fsdp"))), NamedSharding(self.mesh, P())
        jit_init = jax.jit(init, out_shardings=program.shardings)
        with jax.set_mesh(self.mesh):
            jit_step = jax.jit(
                step,
                in_shardings=(program.shardings, rows, replicated, replicated),
                out_shardings=(program.shardings, replicated),
                donate_argnums=0,
            )
        self._programs[key] = (program, jit_init, jit_step)
        return self._programs[key]

    def train(self, data: TaskData, *, kind: str, classes: tuple[int, ...] = (), seed: int = 0):
        """(trained, {"first_loss", "last_loss", "steps"}) of a fresh model trained on `data`
        (`trained` is what `logits` reads); batches follow a seeded permutation of the examples per
        epoch. A non-finite loss is an error, as it stops the trainer."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        length = _round_up(data.inputs.shape[1], LENGTH_BUCKET)
        program, jit_init, jit_step = self._program(length, kind)
        class_ids, class_weights = _class_args(tuple(classes))
        data = pad_to(data, length)
        if kind == "multilabel":  # the target columns of the padding classes (weight 0)
            extra = [(0, 0), (0, 0), (0, MAX_CLASSES - data.targets.shape[-1])]
            data = dataclasses.replace(data, targets=np.pad(data.targets, extra).astype(np.float32))
        rng = np.random.default_rng(seed)
        order = np.zeros((0,), np.int64)
        state = jit_init(np.int32(seed))
        losses = []
        with jax.set_mesh(self.mesh):
            for _ in range(self.steps):
                while len(order) < self.batch_size:
                    order = np.concatenate([order, rng.permutation(len(data))])
                idx, order = order[: self.batch_size], order[self.batch_size :]
                batch = {
                    "inputs": data.inputs[idx],
                    "targets": data.targets[idx],
                    "weights": data.weights[idx],
                }
                state, metrics = jit_step(state, batch, class_ids, class_weights)
                losses.append(metrics["loss"])
        losses = [float(x) for x in jax.device_get(losses)]
        if not np.isfinite(losses).all():
            raise FloatingPointError(f"the task loss became non-finite: {losses}")
        return (program, state["params"]), {
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "steps": self.steps,
        }

    def logits(self, trained, inputs: np.ndarray, classes: tuple[int, ...] = ()) -> np.ndarray:
        """float32 [N, T, V] logits of the trained model on int [N, T] sequences (only the columns
        `classes`, [N, T, K], when given), in batches of the training batch size."""
        program, params = trained
        n, t = inputs.shape
        length = _round_up(t, LENGTH_BUCKET)
        if id(program) not in self._forward:
            apply = program.model.apply
            self._forward[id(program)] = (
                jax.jit(lambda p, x: apply(p, x)),
                jax.jit(lambda p, x, c: apply(p, x)[..., c]),
            )
        full, some = self._forward[id(program)]
        class_ids, _ = _class_args(tuple(classes))
        out = []
        with jax.set_mesh(self.mesh):
            for start in range(0, n, self.batch_size):
                x = np.zeros((self.batch_size, length), np.int32)
                rows = min(self.batch_size, n - start)
                x[:rows, :t] = inputs[start : start + rows]
                logits = some(params, x, class_ids)[..., : len(classes)] if classes else full(params, x)
                out.append(np.asarray(logits, np.float32)[:rows, :t])
        return np.concatenate(out) if out else np.zeros((0, t, len(classes)), np.float32)
